"""The gateway's collectives move their data in non-blocking MPI calls (issue 13: a rank waiting
in a blocking MPICH collective spins on a core the others need); they must still give what
mpi4py's own collectives give."""
from pathlib import Path

import pytest

from conftest import run_mpi


@pytest.mark.parametrize("n", [1, 3])
def test_gateway_collectives_match_mpi4py(n):
    proc = run_mpi(n, [Path(__file__).parent / "mpi_gateway.py", "collectives"], timeout=90)
    assert proc.stdout.count("collectives ok") == n, proc.stdout + proc.stderr
