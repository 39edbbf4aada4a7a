"""The outputs of one algorithm run, shared by the RS Deep algorithms: checked before work starts, written to
hidden temporary files, committed together at the very end.

::

    with RunOutputs(self, parameters, context, feedback, rasters=(self.OUTPUT,)) as outputs:
        engine_call(..., transaction=outputs.transaction)      # rasters, folders, files join the transaction
        with FeatureSinks(self, parameters, context, transaction=outputs.transaction) as sinks:
            ...                                                  # sink files join it too
    # leaving the block: every output renamed into place, or (failure, cancel) every temporary file removed

Creating :class:`RunOutputs` refuses (``QgsProcessingException`` naming both parameters) an output that is an
input (a raster, a vector layer's file, a model folder...), an output that writes over an input's sidecar or into
an input folder, two outputs that are the same file, and a raster output (``rasters``) not named ``.tif``.
While the block runs in the main thread (``qgis_process``), a SIGTERM cancels the run instead of killing it, so
its temporary files are removed; temporary files left by killed runs (older than an hour) are removed from the
output folders.

:class:`ClassOutputs` is the class (or change) raster of segmentation and change detection with its probabilities
and polygons: read from the parameters, styled, reported and written into the run's transaction.
"""
import os

from qgis.core import (QgsMapLayer, QgsProcessingException, QgsProcessingFeatureSourceDefinition,
                       QgsProcessingOutputLayerDefinition, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterRasterDestination,
                       QgsProcessingUtils, QgsProperty)

from ..rs_deep_plugin.compat import push_warning
from ..rs_deep_plugin.engine.files import temp_path
from ..rs_deep_plugin.engine.geo.outputs import OutputTransaction, sigterm_cancels, sweep_stale
from .base import FeedbackBridge, report_class_areas
from .params import MIN_AREA, OUTPUT, OUTPUT_VECTOR, PROBABILITIES, SIMPLIFY, number_or
from .sinks import file_destination, write_class_polygons
from .styles import StyleClasses, style_class_raster

RASTER_EXTENSIONS = (".tif", ".tiff")
# what writing a raster / vector file also writes beside it
_RASTER_SIDECARS = (".aux.xml", ".ovr")
_VECTOR_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", "-wal", "-shm", "-journal")


def remove_files(*paths):
    """Remove files and the sidecars GDAL and QGIS put beside them (``.aux.xml``, ``.ovr``, ``<stem>.qml``);
    missing ones are fine, nothing raises. The one cleanup helper of the algorithms."""
    for path in paths:
        if not path:
            continue
        for p in (path, path + ".aux.xml", path + ".ovr", os.path.splitext(path)[0] + ".qml"):
            try:
                os.remove(p)
            except OSError:
                pass


def _real(path):
    return os.path.normcase(os.path.realpath(os.path.abspath(path)))


#: the parameter types whose string values may name a layer (a layer id or name) rather than a file
LAYER_PARAMETER_TYPES = frozenset({"raster", "vector", "source", "layer", "multilayer", "mesh", "pointcloud"})


def _value_paths(value, context, layers=True):
    """The files or folders an input parameter value reads (a layer's file, a file, a folder). With ``layers``
    False (a file, folder or other parameter), a string that is no existing path is not looked up as a layer:
    QGIS would try every provider on it, and its mesh provider prints "ERROR: Status 2: File ... could not be
    found" (QGIS 3.44) for a bundled model's name."""
    if isinstance(value, QgsProcessingFeatureSourceDefinition):
        value = value.source
    if isinstance(value, QgsProperty):
        value = value.staticValue()
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _value_paths(v, context, layers)]
    if isinstance(value, QgsMapLayer):
        sources = [value.source()]
    elif isinstance(value, str) and value:
        sources = [value]
        if layers and not os.path.exists(value.split("|")[0]):
            layer = QgsProcessingUtils.mapLayerFromString(value, context)
            sources = [layer.source()] if layer is not None else []
    else:
        return []
    paths = []
    for s in sources:
        s = s.split("|")[0]
        if s.startswith("file://"):
            s = s[len("file://"):]
        if s and os.path.exists(s):
            paths.append(s)
    return paths


class StagedOutput:
    """A file an engine call writes whole by itself (no ``transaction`` argument) to the path it is given: ``tmp``,
    a hidden name beside ``final``; renamed over ``final`` when the run's transaction commits, removed when it is
    discarded (a failure, a cancel). Register it with ``transaction.add``."""

    def __init__(self, final):
        self.final = os.path.abspath(final)
        self.tmp = temp_path(self.final)

    def commit(self):
        os.replace(self.tmp, self.final)

    def discard(self):
        remove_files(self.tmp)


class RunOutputs:
    """One algorithm run's outputs: the checks (on creation), the transaction, the SIGTERM guard (the block).

    ``rasters``: the raster destinations the engine writes as GeoTIFF (their name must end in .tif/.tiff).
    ``skip``: destination parameters not to check (written elsewhere than their value says).
    """

    def __init__(self, alg, parameters, context, feedback, rasters=(), skip=()):
        self.alg, self.parameters, self.context, self.feedback = alg, parameters, context, feedback
        self.transaction = OutputTransaction()
        self._guard = None
        self.outputs = self._outputs(skip)
        for name in rasters:
            path = self.outputs.get(name)
            if path and os.path.splitext(path)[1].lower() not in RASTER_EXTENSIONS:
                raise QgsProcessingException(
                    f"{name}: {path} is not a GeoTIFF name; RS Deep writes its rasters as GeoTIFF: give a name "
                    "ending in .tif")
        self._check()
        for path in set(self.outputs.values()):
            sweep_stale(os.path.dirname(path))

    # -- the checks ----------------------------------------------------------------------------------------------

    def _outputs(self, skip):
        """{destination parameter: absolute file or folder path} of the file outputs asked for."""
        found = {}
        for d in self.alg.destinationParameterDefinitions():
            name = d.name()
            value = self.parameters.get(name)
            if name in skip or value in (None, ""):
                continue
            if isinstance(d, (QgsProcessingParameterFeatureSink, QgsProcessingParameterRasterDestination)):
                if isinstance(value, QgsProcessingOutputLayerDefinition):
                    value = QgsProcessingOutputLayerDefinition(value)
                    value.destinationProject = None  # a check only: nothing to load
                else:
                    value = QgsProcessingOutputLayerDefinition(value)
                path = self.alg.parameterAsOutputLayer({name: value}, name, self.context)
                if isinstance(d, QgsProcessingParameterFeatureSink):
                    path = file_destination(path)  # None for memory: and database destinations
            else:
                path = self.alg.parameterAsFileOutput(self.parameters, name, self.context)
            if path and not path.startswith("/vsi"):
                found[name] = os.path.abspath(path)
        return found

    def _inputs(self):
        """[(input parameter, path)] of every file or folder the inputs read."""
        found = []
        for d in self.alg.parameterDefinitions():
            if d.isDestination():
                continue
            for p in _value_paths(self.parameters.get(d.name()), self.context, d.type() in LAYER_PARAMETER_TYPES):
                found.append((d.name(), os.path.abspath(p)))
        return found

    def _written(self, name, path):
        """Every path output ``name`` writes: the file and its sidecars, or (a folder) the folder itself."""
        d = self.alg.parameterDefinition(name)
        stem = os.path.splitext(path)[0]
        if isinstance(d, QgsProcessingParameterRasterDestination):
            return [path] + [path + s for s in _RASTER_SIDECARS] + [stem + ".qml"]
        if isinstance(d, QgsProcessingParameterFeatureSink):
            return [path] + [stem + s for s in _VECTOR_SIDECARS[:5]] + [path + s for s in _VECTOR_SIDECARS[5:]]
        return [path]

    def _check(self):
        folders = {n for n in self.outputs
                   if isinstance(self.alg.parameterDefinition(n), QgsProcessingParameterFolderDestination)}
        written = {n: [_real(p) for p in self._written(n, path)] for n, path in self.outputs.items()}
        for in_name, in_path in self._inputs():
            real_in = _real(in_path)
            for out_name, paths in written.items():
                inside = out_name in folders and real_in.startswith(paths[0] + os.sep)
                # an output in an input folder (a model package...) may not replace a file there
                within = os.path.isdir(real_in) and paths[0].startswith(real_in + os.sep) and \
                    os.path.lexists(paths[0])
                if real_in in paths or inside or within:
                    what = "the same file as" if real_in == paths[0] else (
                        "a folder that holds" if inside else "a file in" if within else "a file written with")
                    raise QgsProcessingException(
                        f"{out_name} ({self.outputs[out_name]}) is {what} the input {in_name} ({in_path}); inputs "
                        f"are never overwritten: choose another {out_name}")
        names = list(self.outputs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pa, pb = written[a], written[b]
                if pa[0] == pb[0] or set(pa) & set(pb) or (a in folders and pb[0].startswith(pa[0] + os.sep)) or \
                        (b in folders and pa[0].startswith(pb[0] + os.sep)):
                    raise QgsProcessingException(
                        f"{a} and {b} are the same file ({self.outputs[a]}) or write over each other; give each "
                        "output its own file name")

    # -- the block -----------------------------------------------------------------------------------------------

    def path(self, final):
        """Where output ``final`` is now: its temporary file until the commit."""
        return self.transaction.path(final)

    def __enter__(self):
        self._guard = sigterm_cancels(self.feedback.cancel)
        self._signals = self._guard.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.feedback.isCanceled() and self.transaction.state == "open":
                exc = QgsProcessingException("The run was cancelled; no output was written.")
            if exc_type is None and exc is None:
                if self.transaction.state == "committed":  # by the algorithm itself (train keeps a whole package)
                    return False
                try:
                    self.transaction.commit()
                except BaseException:  # an RSDeepError (a full disk...) is mapped by RSDeepAlgorithm.processAlgorithm
                    self.transaction.discard()
                    raise
                return False
            self.transaction.discard()
            if exc_type is None:
                raise exc
            return False
        finally:
            guard, self._guard = self._guard, None
            if guard is not None:
                guard.__exit__(None, None, None)
            if self._signals:
                self.feedback.pushInfo("Stopped by SIGTERM: the run was cancelled, its temporary files removed; "
                                       "no output was written")


class ClassOutputs:
    """The class (or change) raster outputs of a run: ``raster`` and ``probabilities`` (paths; None when not
    wanted), ``vector`` (whether polygons are wanted), ``min_area`` and ``simplify`` (-1: the defaults),
    ``confidence`` (the temporary raster the polygons' mean probability is read from; None without polygons).
    Leaving the ``with`` block removes that raster, whatever happened."""

    def __init__(self, alg, parameters, context, confidence_name):
        """OUTPUT, PROBABILITIES, OUTPUT_VECTOR, MIN_AREA and SIMPLIFY (``params.add_class_outputs`` and
        ``add_polygon_block``) of ``alg``; ``confidence_name``: the name of the temporary confidence raster."""
        self.alg, self.parameters, self.context = alg, parameters, context
        self.raster = alg.parameterAsOutputLayer(parameters, OUTPUT, context)
        self.probabilities = alg.parameterAsOutputLayer(parameters, PROBABILITIES, context) or None
        self.vector = parameters.get(OUTPUT_VECTOR) not in (None, "")
        self.min_area = number_or(alg, parameters, MIN_AREA, context, -1)
        self.simplify = number_or(alg, parameters, SIMPLIFY, context, -1)
        self.confidence = QgsProcessingUtils.generateTempFilename(confidence_name) if self.vector else None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        remove_files(self.confidence)
        return False

    def results(self, feedback, outputs, pkg, result, crs, polygons, change=False):
        """Style the class raster of ``result`` (the engine's), report its class areas and write its polygons in
        ``crs`` (``polygons(progress)`` gives their records), all into the transaction of ``outputs``; ``change``:
        class 0 ("no change") transparent, the change area reported. Returns the run's results."""
        for w in result.warnings:
            push_warning(feedback, w)
        style_class_raster(self.raster, pkg.classes, self.context, result.output_file, transparent_background=change)
        report_class_areas(feedback, result, pkg.classes)
        results = {OUTPUT: self.raster}
        if self.probabilities:
            results[PROBABILITIES] = self.probabilities
        if self.vector:
            records = polygons(FeedbackBridge(feedback, 80, 99).progress)
            results.update(write_class_polygons(self.alg, self.parameters, self.context, feedback, outputs.transaction,
                                                OUTPUT_VECTOR, records, crs, lambda: StyleClasses(pkg.classes, change)))
            feedback.pushInfo(f"{len(records)} change polygons, {sum(r['area_m2'] for r in records):,.1f} m² in all"
                              if change else f"{len(records)} polygons")
        return results
