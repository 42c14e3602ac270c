"""GPU binding: the pure rule and bind_device in faked environments (no GPU needed)."""
from __future__ import annotations

import logging
import sys
import types

import pytest

from mpicellpose.cellpose import devices
from mpicellpose.cellpose.devices import (DeviceBinding, choose_device, count_visible_gpus, local_rank_from_env,
                                          visible_gpu_ids)
from mpicellpose.cellpose.gpu import bind_device


# --------------------------------------------------------------------------------------
# choose_device (pure)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("local_rank,local_size,n,expected", [
    (0, 4, 4, "cuda:0"),
    (3, 4, 4, "cuda:3"),
    (5, 8, 4, "cuda:1"),      # more ranks than GPUs: round-robin
    (7, 8, 4, "cuda:3"),
    (3, 4, 1, "cuda:0"),      # srun --gpus-per-task=1: each rank sees one GPU
    (0, 1, 8, "cuda:0"),      # fewer ranks than GPUs
    (1, 2, 0, "cpu"),         # no GPU
    (0, 1, 0, "cpu"),
])
def test_choose_device_auto(local_rank, local_size, n, expected):
    assert choose_device(local_rank, local_size, n) == expected
    assert choose_device(local_rank, local_size, n, "auto") == expected
    assert choose_device(local_rank, local_size, n, " AUTO ") == expected


def test_choose_device_round_robin_is_balanced():
    counts = {}
    for r in range(12):
        d = choose_device(r, 12, 4)
        counts[d] = counts.get(d, 0) + 1
    assert counts == {f"cuda:{k}": 3 for k in range(4)}


@pytest.mark.parametrize("override,n,expected", [
    ("cpu", 4, "cpu"),
    ("CPU", 0, "cpu"),
    ("mps", 0, "mps"),
    ("cuda", 4, "cuda:2"),
    ("gpu", 4, "cuda:2"),
    ("cuda", 1, "cuda:0"),
    ("cuda:3", 4, "cuda:3"),
    ("cuda:0", 1, "cuda:0"),
    ("gpu:1", 2, "cuda:1"),
])
def test_choose_device_override_wins(override, n, expected):
    assert choose_device(2, 4, n, override) == expected


@pytest.mark.parametrize("args,match", [
    ((0, 2, 0, "cuda"), "no GPU"),
    ((0, 2, 2, "cuda:2"), "sees 2 GPU"),
    ((0, 2, 0, "cuda:0"), "sees 0 GPU"),
    ((0, 2, 2, "cuda:x"), "cuda:K"),
    ((0, 2, 2, "tpu"), "unknown device"),
    ((2, 2, 2, None), "local_rank"),
    ((-1, 2, 2, None), "local_rank"),
    ((0, 0, 2, None), "local_size"),
    ((0, 1, -1, None), "n_visible_gpus"),
    ((0.0, 1, 1, None), "integer"),
    ((True, 2, 1, None), "integer"),
])
def test_choose_device_errors(args, match):
    with pytest.raises(ValueError, match=match):
        choose_device(*args)


def test_choose_device_rejects_non_string_override():
    with pytest.raises(TypeError):
        choose_device(0, 1, 1, 3)


# --------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES and launcher variables
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    (None, None),
    ("", []),
    ("-1", []),
    ("NoDevFiles", []),
    ("0", ["0"]),
    ("2,3", ["2", "3"]),
    (" 1 , 0 ", ["1", "0"]),
    ("0,-1,2", ["0"]),   # CUDA stops at the first invalid index
    ("GPU-8e1c0f1a-aaaa,GPU-2b", ["GPU-8e1c0f1a-aaaa", "GPU-2b"]),
    ("MIG-1234", ["MIG-1234"]),
])
def test_visible_gpu_ids(value, expected):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_gpu_ids(env) == expected


def test_visible_gpu_ids_reads_os_environ(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert visible_gpu_ids() == ["5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu_ids() is None


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1)),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 4)),
    ({"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2)),
    ({"SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4(x2)"}, (2, 4)),
    ({"SLURM_LOCALID": "2"}, (2, 3)),
    ({"JSM_NAMESPACE_LOCAL_RANK": "0", "JSM_NAMESPACE_LOCAL_SIZE": "6"}, (0, 6)),
])
def test_local_rank_from_env(env, expected):
    assert local_rank_from_env(env) == expected


# --------------------------------------------------------------------------------------
# a fake torch
# --------------------------------------------------------------------------------------
def _fake_torch(n_gpus, cuda_version="12.4", broken=False):
    """A module that looks like torch as far as gpu.py and info.py are concerned."""
    torch = types.ModuleType("torch")
    torch.version = types.SimpleNamespace(cuda=cuda_version)

    def is_available():
        if broken:
            raise RuntimeError("CUDA driver initialization failed")
        return n_gpus > 0

    def get_device_properties(i):
        return types.SimpleNamespace(name=f"Fake GPU {i}", total_memory=80 * 2**30)

    torch.cuda = types.SimpleNamespace(is_available=is_available,
                                       device_count=lambda: n_gpus,
                                       get_device_properties=get_device_properties)
    return torch


@pytest.fixture
def fake_torch(monkeypatch):
    def install(n_gpus, **kw):
        monkeypatch.setitem(sys.modules, "torch", _fake_torch(n_gpus, **kw))
    return install


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES",) + devices._LOCAL_RANK_VARS + devices._LOCAL_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)


def test_count_visible_gpus_fake(fake_torch, monkeypatch):
    fake_torch(4)
    n, why = count_visible_gpus()
    assert n == 4 and "all GPUs of the node" in why
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    fake_torch(2)
    n, why = count_visible_gpus()
    assert n == 2 and "CUDA_VISIBLE_DEVICES=2,3" in why


def test_count_visible_gpus_no_torch(no_torch):
    n, why = count_visible_gpus()
    assert n == 0 and "torch not installed" in why


def test_count_visible_gpus_cpu_build(fake_torch):
    fake_torch(0, cuda_version=None)
    assert count_visible_gpus() == (0, "torch was built without CUDA")


def test_count_visible_gpus_no_driver(fake_torch):
    fake_torch(0)
    n, why = count_visible_gpus()
    assert n == 0 and "is_available() is False" in why


def test_count_visible_gpus_broken_driver(fake_torch):
    fake_torch(2, broken=True)
    n, why = count_visible_gpus()
    assert n == 0 and "CUDA initialisation failed" in why


def test_count_visible_gpus_hidden_does_not_import_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    class Boom:  # any attribute access would fail the test
        def __getattr__(self, name):
            raise AssertionError("torch must not be touched")

    monkeypatch.setitem(sys.modules, "torch", Boom())
    assert count_visible_gpus() == (0, "CUDA_VISIBLE_DEVICES hides every GPU")


# --------------------------------------------------------------------------------------
# bind_device
# --------------------------------------------------------------------------------------
def test_bind_device_no_comm_uses_launcher_vars(fake_torch, monkeypatch, caplog):
    fake_torch(4)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    with caplog.at_level(logging.INFO, logger="mpicellpose.cellpose.gpu"):
        b = bind_device(None)
    assert isinstance(b, DeviceBinding)
    assert (b.device, b.local_rank, b.local_size, b.n_visible) == ("cuda:2", 2, 4, 4)
    assert b.is_gpu
    assert "rank 0 -> cuda:2 on node" in caplog.text


def test_bind_device_one_gpu_per_rank(fake_torch, monkeypatch):
    # srun --gpus-per-task=1: local rank 3 sees only physical GPU 3, as cuda:0
    fake_torch(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    b = bind_device(None, log=False)
    assert b.device == "cuda:0"
    assert b.reason == "this rank sees exactly one GPU"
    assert b.visible_devices == "3"


def test_bind_device_cpu_fallback_warns(no_torch, caplog):
    with caplog.at_level(logging.INFO, logger="mpicellpose.cellpose.gpu"):
        b = bind_device(None)
    assert b.device == "cpu" and b.n_visible == 0
    assert "torch not installed" in b.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "runs on the CPU" in warnings[0].getMessage()


def test_bind_device_explicit_cpu_is_quiet_and_skips_cuda(monkeypatch, caplog):
    class Boom:
        def __getattr__(self, name):
            raise AssertionError("CUDA must not be initialised for --device cpu")

    monkeypatch.setitem(sys.modules, "torch", Boom())
    with caplog.at_level(logging.INFO, logger="mpicellpose.cellpose.gpu"):
        b = bind_device(None, override="cpu")
    assert b.device == "cpu" and "requested" in b.reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bind_device_bad_override_raises(fake_torch):
    fake_torch(2)
    with pytest.raises(ValueError, match="cuda:5"):
        bind_device(None, override="cuda:5", log=False)


def test_bind_device_log_false_is_silent(no_torch, caplog):
    with caplog.at_level(logging.DEBUG, logger="mpicellpose.cellpose.gpu"):
        bind_device(None, log=False)
    assert not caplog.records


def test_binding_to_dict_and_describe():
    b = DeviceBinding("cuda:1", 1, 4, "node7", 4, "why", rank=5, visible_devices=None)
    d = b.to_dict()
    assert d["device"] == "cuda:1" and d["rank"] == 5 and d["hostname"] == "node7"
    assert b.describe() == "rank 5 -> cuda:1 on node node7 (why)"


# ---- with an MPI communicator (size 1 in-process; the node split is real) -------------
def test_bind_device_with_comm_world(fake_torch, caplog):
    MPI = pytest.importorskip("mpi4py.MPI")
    fake_torch(4)
    comm = MPI.COMM_WORLD.Dup()
    try:
        with caplog.at_level(logging.INFO, logger="mpicellpose.cellpose.gpu"):
            b = bind_device(comm)
    finally:
        comm.Free()
    assert (b.device, b.local_rank, b.local_size, b.rank) == ("cuda:0", 0, 1, 0)
    assert b.hostname == MPI.Get_processor_name()
    # 1 rank, 4 GPUs: three idle GPUs are worth a warning
    assert "left idle" in caplog.text


def test_bind_device_goes_through_the_gateway_only(fake_torch, monkeypatch):
    """No blocking MPI call of its own: the node grouping and the GPU list are two labelled
    gateway collectives (a rank that skipped them would be named, not deadlocked)."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from mpicellpose.comm import Mailbox

    fake_torch(2)
    calls = []

    class Spy(Mailbox):
        def allgather(self, obj, label):
            calls.append(label)
            return super().allgather(obj, label)

    class NoBlockingSplit:  # the communicator, without the calls that block every rank
        def __init__(self, comm):
            self._c = comm

        def __getattr__(self, name):
            if name in ("Split_type", "Split", "Barrier"):
                pytest.fail(f"bind_device called the blocking {name}")
            return getattr(self._c, name)

    comm = MPI.COMM_WORLD.Dup()
    try:
        b = bind_device(Spy(NoBlockingSplit(comm)), log=False)
    finally:
        comm.Free()
    assert b.device == "cuda:0"
    assert calls == ["device binding: ranks per node", "device binding: GPUs taken"]


def test_bind_device_with_comm_bad_override_frees_and_raises(fake_torch):
    MPI = pytest.importorskip("mpi4py.MPI")
    fake_torch(1)
    with pytest.raises(ValueError):
        bind_device(MPI.COMM_WORLD, override="cuda:1", log=False)


def test_bind_device_warns_when_ranks_share_one_gpu(fake_torch, monkeypatch, caplog):
    """Node-local ranks that all got the same physical GPU are reported."""
    fake_torch(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")

    class FakeGateway:  # rank 0 of three ranks on one node
        rank = 0

        def node_local(self, label):
            return 0, 3, "node1"

        def allgather(self, obj, label):
            return [obj, obj, obj]

    pytest.importorskip("mpi4py.MPI")
    with caplog.at_level(logging.INFO, logger="mpicellpose.cellpose.gpu"):
        b = bind_device(FakeGateway())
    assert b.device == "cuda:0"
    assert "3 ranks share 1 GPU" in caplog.text
