"""The tiled inference tasks on a Dask cluster (optional: ``pip install 'dask[distributed]==2026.8.0'``).

``cluster`` is a scheduler address (``tcp://host:8786``; a bare ``host:port`` is taken as tcp) or ``local:N``, a
LocalCluster of N worker processes on this machine (the cores shared between them: :func:`local_threads`). Dask is
imported here only, and only when a run asks for a cluster.

* The raster is cut into blocks on the run's own global tile grid. Each task opens the input itself (any path GDAL
  opens: the workers must reach it) and runs its tiles with the weights and in the order of the single-process run;
  no raster data leaves the client. Blended tasks (:func:`.segment.segment_block`; regression and super-resolution:
  :func:`.predict.predict_block_task`, both blended by :func:`.segment.blend_block`) get whole tile rows of the
  single-process run's column bands (:meth:`.tiling.TileGrid.row_blocks`), so that each tile runs once: a block
  returns the pixels it finishes alone, and the rows it shares with the blocks above and below (the overlap of two
  tile rows) are joined by the client (:class:`.segment.SeamJoiner`) in the single-process order, bit for bit.
  Detection, instance and patch blocks (:meth:`.tiling.TileGrid.blocks`) return what their tiles find (boxes:
  :func:`.detect.tile_detections`; polygons: :func:`.instances.tile_instances`) or the classes of their patches,
  merged by the client as in one process. The client writes and commits the outputs as a run in one process does, so the
  results are the same.
* The model travels once as the bytes of its package (scattered to every worker), never as a pickled network;
  each worker loads it once, on its own device (a GPU worker uses its GPU).
* A worker that dies is replaced and its block run again by Dask; a block that fails fails the run, naming its
  window; cancel cancels the futures. Nothing is committed unless every block succeeded.
"""
import dataclasses
import hashlib
import io
import os
import tempfile
import zipfile
from functools import partial

from ..errors import InputError, RSDeepError

DASK_PIN = "dask[distributed]==2026.8.0"
#: the environment variable that gives the default cluster of batch runs (qgis_process)
SCHEDULER_ENV = "RS_DEEP_DASK_SCHEDULER"
#: a scheduler that does not answer within this many seconds is reported unreachable
CONNECT_TIMEOUT = 5
#: how long to wait for a first worker on a scheduler that has none
WORKER_TIMEOUT = 60
#: the Dask setting that keeps MALLOC_TRIM_THRESHOLD_ out of the workers' environment (see ClusterSession); for
#: ``dask worker``: DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None
NO_MALLOC_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
#: the CPU threads of a network (torch and onnxruntime; :func:`..models.runners.prepare_device`)
THREADS_ENV = "RS_DEEP_THREADS"
WORKER_THREADS = "distributed.nanny.pre-spawn-environ." + THREADS_ENV


def local_threads(workers):
    """The CPU threads of each of ``workers`` LocalCluster processes: this machine's cores shared between them."""
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))


def default_cluster(value=None):
    """``value`` stripped, else :data:`SCHEDULER_ENV`'s, else None (a run in this process)."""
    value = (value or "").strip() or os.environ.get(SCHEDULER_ENV, "").strip()
    return value or None


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise InputError(f"CLUSTER needs Dask, which is not installed ({exc}): pip install '{DASK_PIN}' "
                         "(in QGIS's Python, on this machine and on every worker), or leave CLUSTER empty") from exc
    return distributed


def parse_cluster(cluster):
    """("local", N) or ("address", "tcp://host:port") for a CLUSTER value; an InputError naming the forms."""
    spec = (cluster or "").strip()
    if spec.lower().startswith("local"):
        n = spec[len("local"):].lstrip(":").strip() or str(os.cpu_count() or 1)
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"CLUSTER {cluster!r}: 'local:N' needs N, the number of worker processes (e.g. local:2)")
        return "local", int(n)
    if not spec:
        raise InputError("CLUSTER is empty: give a scheduler address (tcp://host:8786) or local:N")
    if "://" not in spec:
        spec = "tcp://" + spec
    return "address", spec


class ClusterSession:
    """A Dask client for one run (``with``): on a LocalCluster it starts, or on the scheduler at an address."""

    def __init__(self, cluster, log=None):
        self.kind, self.where = parse_cluster(cluster)
        self.log = log or (lambda msg: None)
        self.local = None
        self.client = None
        self.environ = None

    def __enter__(self):
        distributed = _dask()
        if self.kind == "local":
            _python_for_workers()
            import dask
            # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap
            # threshold: every large tensor is then mmapped and unmapped again, and a network runs 1.5x slower
            settings = {NO_MALLOC_TRIM: None}
            if not os.environ.get(THREADS_ENV):
                # the workers share this machine's cores: each runs its network on cores / N threads (Dask's nanny
                # would leave them 1 each); RS_DEEP_THREADS, when set, is inherited as it is
                settings[WORKER_THREADS] = str(local_threads(self.where))
            # the nanny puts its pre-spawn environment (and OMP_NUM_THREADS=1...) into this process's os.environ to
            # spawn a worker, and leaves it there: QGIS's own later runs would then run on 1 thread
            self.environ = dict(os.environ)
            try:
                with dask.config.set(settings):
                    self.local = distributed.LocalCluster(n_workers=self.where, threads_per_worker=1, processes=True,
                                                          dashboard_address=":0", silence_logs=40)
            finally:
                _restore_environ(self.environ)
            self.client = distributed.Client(self.local)
        else:
            try:
                self.client = distributed.Client(self.where, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                raise InputError(f"Cannot reach the Dask scheduler at {self.where} ({exc}). Start it (dask scheduler; "
                                 f"dask worker {self.where}), correct CLUSTER (or {SCHEDULER_ENV}), or use local:N "
                                 "for worker processes on this machine") from exc
            try:
                self.client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self.client.close()
                raise InputError(f"The Dask scheduler at {self.where} has no worker after {WORKER_TIMEOUT} s: start "
                                 f"some (dask worker {self.where})") from exc
        workers = self.client.scheduler_info().get("workers", {})
        self.log(f"Dask: {len(workers)} worker(s), {sum(w.get('nthreads', 1) for w in workers.values())} thread(s) "
                 f"on {self.where if self.kind == 'address' else f'a LocalCluster of {self.where} processes'}; "
                 f"dashboard {self.client.dashboard_link}")
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.local is not None:
            self.local.close()
            _restore_environ(self.environ)  # a worker restarted during the run was spawned the same way
        return False


def _restore_environ(saved):
    """Put this process's environment back to ``saved``: the variables added since removed, the changed ones reset."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _python_for_workers():
    """Worker processes are spawned with ``sys.executable``, which in QGIS is QGIS itself or whatever ``python3``
    comes first on PATH: use the Python QGIS runs (its own ``sys.path`` goes to the workers)."""
    import multiprocessing
    import sys
    exe = sys.executable or ""
    homes = {os.path.realpath(os.path.join(p, d)) for p in (sys.prefix, sys.exec_prefix)
             for d in ("bin", "Scripts", ".")}
    if os.path.basename(exe).lower().startswith("python") and os.path.realpath(os.path.dirname(exe)) in homes:
        return
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in (os.path.join(sys.exec_prefix, "bin", f"python{version}"),
                 os.path.join(sys.exec_prefix, "bin", "python3"),
                 os.path.join(sys.exec_prefix, "python.exe")):
        if os.path.isfile(cand):
            multiprocessing.set_executable(cand)
            sys.executable = cand  # distributed's Nanny reads it too
            return


# -----------------------------------------------------------------------------------------------------------
# the model, shipped as its package's bytes


def package_payload(pkg):
    """(file name, bytes) of the model package ``pkg`` was loaded from: a folder is zipped (model.json and its
    weights), a zip or an .onnx file sent as it is."""
    src = os.fspath(pkg.source)
    if os.path.isfile(src) and os.path.basename(src) == "model.json":
        src = os.path.dirname(src) or "."
    if os.path.isdir(src):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name in sorted(os.listdir(src)):
                if os.path.isfile(os.path.join(src, name)):
                    zf.write(os.path.join(src, name), name)
        return "model.zip", buf.getvalue()
    if not os.path.isfile(src):
        raise InputError(f"CLUSTER: the model package {src!r} is not a file or folder, so it cannot be sent to the "
                         "workers; save it as a package (folder or .zip) first")
    with open(src, "rb") as f:
        return os.path.basename(src), f.read()


_WORKER_MODELS = {}  # in each worker process: (sha256, gsd, tiling, device, tta, kind, detection) -> (package,
#                     runner, batch)


def _worker_model(payload, job, kind):
    """The package of ``payload`` loaded in this worker (once), its runner on the worker's device, its batch. The
    package's bytes go to a temporary folder only while the network is loaded (nothing is left on the worker)."""
    name, data = payload
    sha = hashlib.sha256(data).hexdigest()
    key = (sha, job["gsd"], job.get("tiling"), job["device"], job.get("tta"), kind, job.get("detection"),
           job.get("input_percentiles"))
    if key not in _WORKER_MODELS:
        from ..models.loading import load_package
        from ..models.onnx.cache import inference_backend, make_runner
        from ..models.runners import default_batch_size, select_device
        with tempfile.TemporaryDirectory(prefix="rs_deep_model_") as folder:
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(data)
            # the client's choices: processing resolution and per-input scaling (the package's or a run's override)
            pkg = dataclasses.replace(load_package(path), gsd=job["gsd"],
                                      input_percentiles=job.get("input_percentiles"))
            if job.get("tiling"):
                pkg = pkg.with_tiling(*job["tiling"])
            # the runner applies RS_DEEP_THREADS (CPU threads); a package cached for onnxruntime runs there
            dev = select_device(job["device"], inference_backend(pkg, job["device"]))
            if kind == "detection":
                runner = pkg.make_detection_runner(dev, *job["detection"])
            else:
                from ..models.tta import with_tta
                runner = with_tta(make_runner(pkg, dev), job["tta"])
        bs = int(job["batch_size"]) if job.get("batch_size") else default_batch_size(dev)
        _WORKER_MODELS.clear()  # one model per worker at a time
        _WORKER_MODELS[key] = (pkg, runner, bs)
    return _WORKER_MODELS[key]


def _block_error(block, exc):
    bx0, by0, bx1, by1 = block
    what = exc if isinstance(exc, RSDeepError) else f"{type(exc).__name__}: {exc}"
    return InputError(f"The block of columns {bx0}-{bx1}, rows {by0}-{by1} (window x={bx0}, y={by0}, "
                      f"{bx1 - bx0} x {by1 - by0} px) failed: {what}")


def _block_task(job, payload, i):
    """On a worker: block ``i`` of a run, ``job["run"](reader, runner, job, i, batch size)`` with the input opened
    here and the model of ``payload`` loaded once per worker."""
    try:
        pkg, runner, bs = _worker_model(payload, job, job["kind"])
        reader = job["open_reader"](pkg)
        try:
            return job["run"](reader, runner, job, i, bs)
        finally:
            reader.close()
    except Exception as exc:
        error = _block_error(job["windows"][i], exc)
    # raised out of the except block: no chained exception to pickle (some, e.g. GDAL's, do not unpickle)
    raise error


# -----------------------------------------------------------------------------------------------------------
# the client


def _absolute_paths(opener):
    """``opener`` (a :func:`functools.partial` of a reader) with its arguments that are files here made absolute."""
    args = [os.path.abspath(a) if isinstance(a, (str, os.PathLike)) and os.path.exists(a) else a for a in opener.args]
    return partial(opener.func, *args, **opener.keywords)


def run_blocks(cluster, pkg, job, prog, log, share=0.95):
    """Run the blocks of ``job`` (``job["windows"]``, one task each: :func:`_block_task`, which calls
    ``job["run"](reader, runner, job, i, batch size)``, a module-level function of the inference module that
    asked, e.g. :func:`.segment.segment_block_task`; ``job["kind"]``: "dense", a probability or value runner, or "detection", a detection or instance
    segmentation runner) on ``cluster``;
    yields their results as they come (any order). Progress runs to ``share``; cancel cancels the futures
    (:class:`..errors.Cancelled`)."""
    distributed = _dask()
    windows = job["windows"]
    if str(cluster).strip().lower().startswith("local:"):  # workers on this machine share its ONNX cache: made once
        from ..models.onnx.cache import inference_backend
        tiled = pkg.with_tiling(*job["tiling"]) if job.get("tiling") else pkg
        inference_backend(dataclasses.replace(tiled, gsd=job["gsd"]), job["device"], log)
    with ClusterSession(cluster, log) as client:
        job = dict(job, open_reader=_absolute_paths(job["open_reader"]),  # the workers run elsewhere
                   input_percentiles=pkg.input_percentiles)
        payload = client.scatter(package_payload(pkg), broadcast=True, hash=False)
        job_f = client.scatter(job, broadcast=True, hash=False)
        futures = {client.submit(_block_task, job_f, payload, i, pure=False, key=f"rs_deep-block-{i}"): i
                   for i in range(len(windows))}
        pending = set(futures)
        done = 0
        try:
            while pending:
                prog.check()
                try:
                    finished, pending = distributed.wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
                for f in finished:
                    try:
                        res = f.result()
                    except RSDeepError:
                        raise
                    except Exception as exc:  # e.g. KilledWorker: the block's workers died too often
                        raise _block_error(windows[futures[f]], exc) from None
                    f.release()
                    done += 1
                    prog.update(share * done / len(windows), None)
                    yield res
        except BaseException:
            client.cancel(list(futures))
            raise


__all__ = ["ClusterSession", "default_cluster", "parse_cluster", "package_payload", "run_blocks", "local_threads",
           "SCHEDULER_ENV", "DASK_PIN"]
