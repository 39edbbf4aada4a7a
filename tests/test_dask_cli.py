"""The Dask backend on a scheduler and workers started by hand with Dask's own command line (``dask scheduler``,
``dask worker --nworkers 2 --nthreads 1``), as SLURM job scripts, dask-jobqueue or the Dask Helm chart start them:
every inference algorithm gives what one process gives (the equality tests of test_distributed.py and
test_distributed_more.py, run again against this cluster), and ``qgis_process`` with ``CLUSTER=tcp://...``."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import rasterio

from conftest import DEV_PLUGINS, SAMPLE
# the equality tests, collected here again: they take this module's ``cluster`` fixture
from test_distributed import (BLOCK, BUILDINGS, reference, test_change_equals_one_process,  # noqa: F401
                              test_detection_same_boxes, test_patches_equal_one_process,
                              test_segmentation_equals_one_process)
from test_distributed_more import (test_instances_equal_one_process, test_regression_equals_one_process,  # noqa: F401
                                   test_super_resolution_equals_one_process)
from test_change import pair, scene  # noqa: F401 (fixtures of the imported tests)
from test_instances import trained_on_atlanta  # noqa: F401

DASK = [sys.executable, "-m", "dask"]  # the `dask` command of this environment


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a ``dask scheduler`` and a ``dask worker`` of 2 processes (1 thread each) started as
    subprocesses, with the plugin on their PYTHONPATH as the README's recipe says."""
    folder = tmp_path_factory.mktemp("dask_cli")
    info = folder / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DEV_PLUGINS)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    logs = [open(folder / name, "w") for name in ("scheduler.log", "worker.log")]
    procs = [subprocess.Popen(DASK + ["scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(info)], env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        for _ in range(300):
            if info.exists() and info.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen(DASK + ["worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--no-dashboard"], env=env, stdout=logs[1], stderr=subprocess.STDOUT))
        import distributed
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        _stop(procs)
        for f in logs:
            f.close()


def test_qgis_process_with_a_hand_started_cluster(cluster, reference, tmp_path):  # noqa: F811 (fixtures)
    from qgis_env import run_qgis_process
    _, cls, _, _ = reference
    out = tmp_path / "q.tif"
    run_qgis_process(["run", "rs_deep:segment", "--", f"INPUT={SAMPLE}", f"MODEL={BUILDINGS}", f"OUTPUT={out}",
                      "TILE_SIZE=128", "OVERLAP=32", f"CLUSTER={cluster}", f"CLUSTER_BLOCK={BLOCK}"])
    with rasterio.open(out) as ds:
        assert (ds.read() == cls).all()
