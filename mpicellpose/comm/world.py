"""The MPI library itself: import on first use, COMM_WORLD or a one-rank stand-in, the
launcher's view, duplicating and freeing communicators, facts for ``mpicellpose info``.

The only place (with :mod:`.mailbox`, :mod:`.collectives` and :mod:`.streams`) that touches mpi4py."""
from __future__ import annotations

import os
import socket
import time

from ..errors import DistributedError


_MPI = []   # the mpi4py.MPI module once imported (the waiting loops ask for it thousands of times)


def _mpi():
    if _MPI:
        return _MPI[0]
    try:
        from mpi4py import MPI
    except Exception:  # ImportError, or mpi4py without an MPI library
        return None
    _MPI.append(MPI)
    return MPI


class SelfComm:
    """A one-rank communicator with the subset of mpi4py's API used here."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    rank = property(Get_rank)
    size = property(Get_size)

    def Dup(self):
        return SelfComm()

    def Free(self):
        pass

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root=0):
        return [obj]

    def scatter(self, objs, root=0):
        return objs[0]

    def alltoall(self, objs):
        return list(objs)

    def allreduce(self, obj, op=None):
        return obj

    def Barrier(self):
        pass

    def Abort(self, code=1):
        os._exit(code)

    def Get_name(self):
        return "SelfComm"


def world():
    """COMM_WORLD if mpi4py works, else a one-rank stand-in."""
    MPI = _mpi()
    return MPI.COMM_WORLD if MPI is not None else SelfComm()


def processor_name() -> str:
    MPI = _mpi()
    try:
        return MPI.Get_processor_name() if MPI is not None else socket.gethostname()
    except Exception:  # pragma: no cover - an MPI without processor names
        return socket.gethostname()


def library_version() -> str | None:
    """First line of the MPI library's version string (None without mpi4py)."""
    MPI = _mpi()
    if MPI is None:
        return None
    return MPI.Get_library_version().strip().splitlines()[0].strip()


# set by MPI launchers in every process they start (MPICH/Intel MPI, Open MPI, MVAPICH, srun steps)
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_size(environ=None):
    """(number of processes the launcher says it started, variable) or (None, None)."""
    env = os.environ if environ is None else environ
    for var in _LAUNCHER_SIZE_VARS:
        try:
            n = int(env.get(var, ""))
        except ValueError:
            continue
        if n > 0:
            return n, var
    return None, None


def check_world(comm, environ=None) -> None:
    """Refuse to run when a launcher started N > 1 processes but MPI sees a world of 1.

    That happens when ``mpiexec`` and mpi4py come from different MPI libraries: every
    process would believe it is alone and they would all write the same output at once.
    """
    n, var = launched_size(environ)
    if n and n > 1 and comm.Get_size() == 1:
        lib = library_version() or "no MPI library"
        raise DistributedError(
            f"the launcher started {n} processes ({var}={n}) but MPI sees a world of 1 ({lib}): mpiexec/srun "
            "and mpi4py use different MPI libraries, and every process would run alone on the same output. "
            "Use the mpiexec that matches mpi4py (e.g. the one in the same venv for the 'mpich' wheel), or "
            "build mpi4py against the cluster's MPI (see README, Install)."
        )


def _sleep_until(test, interval=0.002):
    delay = interval
    while not test():
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def dup(comm=None):
    """Duplicate the caller's communicator (COMM_WORLD when None), waiting without spinning."""
    comm = world() if comm is None else comm
    if comm.Get_size() == 1 or not hasattr(comm, "Idup"):
        return comm.Dup()
    new, req = comm.Idup()
    _sleep_until(req.Test)
    return new


def free(comm) -> None:
    try:
        comm.Free()
    except Exception:  # pragma: no cover - already freed / finalized
        pass


def quiet_barrier(comm, poll=None) -> None:
    """A barrier that sleeps instead of spinning while it waits (no labels, no watchdog)."""
    if comm.Get_size() == 1:
        return

    def test():
        if poll is not None:
            poll()
        return req.Test()

    req = comm.Ibarrier()
    _sleep_until(test)



def block_inside_mpi() -> None:
    """Fault injection only: a blocking barrier on COMM_WORLD that no other rank enters."""
    MPI = _mpi()
    if MPI is not None:
        MPI.COMM_WORLD.Barrier()



# --------------------------------------------------------------------------- facts for `mpicellpose info`
def mpi_import_error() -> str | None:
    """Why mpi4py cannot be used here (the import error's text), or None when it can."""
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception as exc:  # ImportError, or mpi4py without an MPI library
        return str(exc)
    return None


def mpi_standard() -> str | None:
    """Version of the MPI standard the library implements, e.g. ``"4.0"`` (None without mpi4py)."""
    MPI = _mpi()
    if MPI is None:
        return None
    major, minor = MPI.Get_version()
    return f"{major}.{minor}"


def thread_level_name() -> str | None:
    """The thread support MPI was initialised with (``"THREAD_MULTIPLE"``, ...); None without
    mpi4py or when the level is not one of the four named ones."""
    MPI = _mpi()
    if MPI is None:
        return None
    names = {getattr(MPI, n, None): n for n in
             ("THREAD_SINGLE", "THREAD_FUNNELED", "THREAD_SERIALIZED", "THREAD_MULTIPLE")}
    return names.get(MPI.Query_thread())


def query_cuda_support() -> tuple[bool, str] | None:
    """Does the MPI library accept CUDA buffers, as it reports itself: ``(answer, function)``
    with the name of the mpi4py function that answered (``"Query_cuda_support"`` or
    ``"MPIX_Query_cuda_support"``); None when unknown (no mpi4py, no such function, or the
    query failed)."""
    try:
        MPI = _mpi()
        if MPI is None:
            return None
        for name in ("Query_cuda_support", "MPIX_Query_cuda_support"):
            query = getattr(MPI, name, None)
            if query is not None:
                return bool(query()), name
    except Exception:  # the query failed
        pass
    return None
