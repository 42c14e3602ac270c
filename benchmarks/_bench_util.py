"""Small helpers shared by the benchmark scripts (standard library + numpy only).

* :func:`vm_hwm` / :func:`vm_rss`: the kernel's peak / current resident set of a live
  process, from ``/proc/<pid>/status`` (``VmHWM`` is exact: the kernel updates it on every
  page fault, so no sampling can miss a short spike).
* :class:`TreeSampler`: a thread that follows a process and all its descendants (found by
  scanning ``/proc/*/stat`` parent links) and keeps, per pid, the largest ``VmHWM`` and
  ``VmRSS`` seen, CPU seconds (user + system, last sample), thread count and command line,
  and the largest summed RSS of the tree.
  ``VmHWM`` of a process that exits between two samples is lost, which is why the
  benchmark's own per-rank scripts also report their ``VmHWM`` just before exiting.
* :func:`run_cmd`: run a command with a hard timeout (process group killed on expiry),
  with the tree sampled; never raises, returns a dict with ``rc``, ``wall_s``, output
  tails, memory and ``error``.
* :func:`machine_info`: host, CPU model, cores, memory, load averages.

``ru_maxrss`` of ``RUSAGE_CHILDREN`` is not used for ranks: it reports the maximum over
*all* waited-for descendants, i.e. one number for the whole run, not per rank, and a
process started with ``exec`` inherits its parent's value.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import threading
import time


def _status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def vm_hwm(pid="self") -> int:
    """Peak resident set size (bytes) of a live process; 0 if unreadable."""
    return _status_kb(pid, "VmHWM:")


def vm_rss(pid="self") -> int:
    """Current resident set size (bytes) of a live process; 0 if unreadable."""
    return _status_kb(pid, "VmRSS:")


def proc_stats():
    """(pid, command name, fields after the name) of every process visible in /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        # the command may contain spaces and parentheses: split after the last ')'
        yield int(name), s[s.find("(") + 1:s.rfind(")")], s[s.rfind(")") + 2:].split()


def _children_map():
    """{ppid: [pid, ...]} for every process visible in /proc."""
    out = {}
    for pid, _, rest in proc_stats():
        try:
            out.setdefault(int(rest[1]), []).append(pid)
        except (IndexError, ValueError):
            continue
    return out


def descendants(pid: int):
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def cpu_and_threads(pid):
    """(user+system CPU seconds, number of threads) of a live process; (0.0, 0) if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        rest = s[s.rfind(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK"), int(rest[17])
    except (OSError, ValueError, IndexError):
        return 0.0, 0


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        return ""


class TreeSampler:
    """Peak memory of a process tree (root pid and its descendants), sampled by a thread."""

    def __init__(self, root_pid: int, interval: float = 0.2, include_root: bool = True,
                 max_total_rss: int | None = None, min_available: int | None = None):
        self.root = root_pid
        self.max_total_rss, self.min_available = max_total_rss, min_available
        self.killed = None
        self.interval = interval
        self.include_root = include_root
        self.hwm, self.rss, self.cmd, self.cpu, self.threads = {}, {}, {}, {}, {}
        self.peak_total_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True, name="tree-sampler")

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        pids = ([self.root] if self.include_root else []) + descendants(self.root)
        total = 0
        for p in pids:
            rss = vm_rss(p)
            if not rss:
                continue
            total += rss
            self.rss[p] = max(self.rss.get(p, 0), rss)
            self.hwm[p] = max(self.hwm.get(p, 0), vm_hwm(p))
            cpu, nth = cpu_and_threads(p)
            self.cpu[p] = max(self.cpu.get(p, 0.0), cpu)
            self.threads[p] = max(self.threads.get(p, 0), nth)
            if p not in self.cmd:
                self.cmd[p] = _cmdline(p)
        self.peak_total_rss = max(self.peak_total_rss, total)
        self.samples += 1
        if self.killed is None and ((self.max_total_rss and total > self.max_total_rss) or
                                    (self.min_available and mem_available() < self.min_available)):
            self.killed = (f"memory guard: tree RSS {total / 2**30:.2f} GiB, MemAvailable "
                           f"{mem_available() / 2**30:.2f} GiB")
            try:
                os.killpg(self.root, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def report(self, min_bytes: int = 20 << 20):
        procs = [{"pid": p, "vm_hwm_bytes": self.hwm.get(p, 0), "peak_rss_sampled_bytes": r,
                  "cpu_s": round(self.cpu.get(p, 0.0), 2), "max_threads": self.threads.get(p, 0),
                  "cmd": self.cmd.get(p, "")}
                 for p, r in sorted(self.rss.items()) if max(r, self.hwm.get(p, 0)) >= min_bytes]
        return {"processes": procs, "peak_total_rss_sampled_bytes": self.peak_total_rss,
                "samples": self.samples, "killed": self.killed}


def run_cmd(cmd, *, timeout, env=None, cwd=None, log_path=None, sample=True, nice=None,
            max_total_rss=None, min_available=None):
    """Run ``cmd`` (list) with a hard timeout; never raises.

    Returns ``{"cmd", "rc", "wall_s", "timed_out", "stdout_tail", "stderr_tail", "memory",
    "error"}``; the full stdout/stderr go to ``log_path`` (+ ``.out``/``.err``) when given.
    ``max_total_rss`` / ``min_available`` (bytes): a memory guard that kills the process
    group when the tree's summed RSS exceeds it or the machine's MemAvailable drops below.
    """
    if nice is not None:
        cmd = ["nice", "-n", str(int(nice))] + list(cmd)
    res = {"cmd": " ".join(str(c) for c in cmd), "rc": None, "timed_out": False, "error": None}
    out_f = open(log_path + ".out", "w") if log_path else subprocess.PIPE
    err_f = open(log_path + ".err", "w") if log_path else subprocess.PIPE
    t0 = time.perf_counter()
    sampler = None
    try:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out_f, stderr=err_f, env=env, cwd=cwd,
                                start_new_session=True)
    except OSError as exc:
        res["error"] = f"could not start: {exc}"
        res["wall_s"] = 0.0
        return res
    if sample:
        sampler = TreeSampler(proc.pid, max_total_rss=max_total_rss, min_available=min_available).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        res["timed_out"] = True
        res["error"] = f"timed out after {timeout} s"
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res["rc"] = proc.returncode
    if sampler is not None:
        sampler.stop()
        res["memory"] = sampler.report()
        if sampler.killed:
            res["error"] = sampler.killed
    if log_path:
        out_f.close()
        err_f.close()
        out = open(log_path + ".out", errors="replace").read()
        err = open(log_path + ".err", errors="replace").read()
    else:
        out = (out or b"").decode(errors="replace")
        err = (err or b"").decode(errors="replace")
    res["stdout_tail"] = out[-3000:]
    res["stderr_tail"] = err[-3000:]
    if proc.returncode != 0 and res["error"] is None:
        res["error"] = f"exit code {proc.returncode}: " + (err.strip().splitlines() or [""])[-1][:500]
    return res


def last_json_line(text):
    """The last line of ``text`` that parses as a JSON object, or None."""
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k in ("MemTotal", "MemAvailable"):
                    mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "mem_total_bytes": mem.get("MemTotal"),
            "mem_available_bytes": mem.get("MemAvailable"), "loadavg": list(os.getloadavg()),
            "python": platform.python_version()}


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
