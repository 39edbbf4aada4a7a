"""Vector outputs (feature sinks) that a full disk cannot corrupt, shared by the RS Deep algorithms.

QGIS writes a file destination in place: the earlier file is replaced as soon as the sink is created, and a
full disk surfaces, if at all, as a ``False`` from ``addFeature`` or as an error that the writer swallows
when it commits (GeoPackage). Here a file destination (GeoPackage, shapefile, GeoJSON, CSV...) is written to
a hidden temporary file beside it, with the same driver (``.<stem>.rsdeep-<hex><ext>``); every ``addFeature``
is checked; at the end the file is closed, reopened and its features counted, and only then renamed into
place, and the layer Processing loads on completion (with its style post-processor) is the final file.
Anything failing raises a ``QgsProcessingException`` that mentions disk space, removes the temporary files and
leaves the earlier file untouched. Other destinations (``TEMPORARY_OUTPUT`` / ``memory:``, database URIs such
as ``postgres:...`` or ``ogr:dbname=...``) are written as QGIS always did, with ``addFeature`` checked::

    with FeatureSinks(self, parameters, context) as sinks:
        sink = sinks.create(self.OUTPUT, fields, QgsWkbTypes.Polygon, crs, style=lambda: _Style(classes))
        for feat in features:
            sink.addFeature(feat, QgsFeatureSink.FastInsert)
    results.update(sinks.results)  # {OUTPUT: final destination}, committed at the end of the block

With ``transaction`` (an engine :class:`OutputTransaction`, see ``outputs.py``), the files are closed and
verified at the end of the block but renamed into place only when the transaction commits, with the run's
other outputs; a failure later in the run removes them as well.
"""
import contextlib
import os
import re
import uuid

from qgis.core import (QgsFeature, QgsFeatureSink, QgsGeometry, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingOutputLayerDefinition, QgsProcessingUtils, QgsProperty, QgsVectorFileWriter,
                       QgsWkbTypes)
from qgis.PyQt.QtCore import QFileInfo

from ..rs_deep_plugin.compat import make_fields
from ..rs_deep_plugin.engine.geo.writer import quiet_osgeo_exceptions_warning

_PROVIDER_URI = re.compile(r"^(.{3,}?):(.*)$")  # QGIS's test for "provider:uri" destinations (postgres:, ogr:...)
# files a format writes beside its main file, stale when an earlier output is replaced by one without them
_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".fix", ".qpj")
_JOURNALS = ("-wal", "-shm", "-journal")  # SQLite (GeoPackage): an old journal would be applied to the new file
_DISK = "disk full? Free space or choose another output folder (the earlier file was left untouched)"


def file_destination(dest):
    """The file path of a sink destination that QGIS would write with QgsVectorFileWriter, else None."""
    if not dest or dest.startswith(("memory:", "/vsi")) or _PROVIDER_URI.match(dest):
        return None
    ext = os.path.splitext(dest)[1]
    if not ext or not QgsVectorFileWriter.driverForExtension(ext[1:]):
        dest += ".gpkg"  # as QGIS does for a name without a known extension
    return os.path.abspath(dest)


class _CheckedSink:
    """A feature sink whose failed ``addFeature`` raises (naming the output) instead of returning False."""

    def __init__(self, sink, label):
        self._sink = sink
        self.label = label
        self.added = 0

    def addFeature(self, feature, flags=QgsFeatureSink.FastInsert):  # noqa: N802 (QGIS API)
        if not self._sink.addFeature(feature, flags):
            error = self._sink.lastError()
            raise QgsProcessingException(f"Writing {self.label} failed (a feature could not be added"
                                         f"{': ' + error if error else ''}); {_DISK}")
        self.added += 1
        return True

    def addFeatures(self, features, flags=QgsFeatureSink.FastInsert):  # noqa: N802 (QGIS API)
        for f in features:
            self.addFeature(f, flags)
        return True

    def close(self):
        """Flush and close: a file writer commits and closes its file only when it is deleted, and ignores a
        failed commit (GeoPackage: "sqlite3_exec(COMMIT) failed: disk I/O error"), so GDAL's errors count."""
        from qgis.PyQt import sip
        sink, self._sink = self._sink, None
        if sink is None:
            return
        with _gdal_errors() as errors:
            try:
                ok = sink.flushBuffer()
                error = sink.lastError() if not ok else ""
            finally:
                if sip.ispyowned(sink):
                    sip.delete(sink)
        if not ok or errors:
            raise QgsProcessingException(f"Writing {self.label} failed (the last features could not be written: "
                                         f"{error or (errors + ['unknown error'])[0]}); {_DISK}")


class _Output:
    """One sink output: its destination, its checked sink and, for a file, the temporary file written first."""

    def __init__(self, name, dest, style, final=None, tmp=None, layer_name=None):
        self.name, self.dest, self.style = name, dest, style
        self.final, self.tmp, self.layer_name = final, tmp, layer_name
        self.sink = None
        self.layer_details = None

    def temp_files(self):
        """The temporary file and whatever its driver wrote beside it (.dbf, .prj, -journal...)."""
        if not self.tmp:
            return []
        folder, base = os.path.split(os.path.splitext(self.tmp)[0])
        try:
            return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(base)]
        except OSError:
            return []

    def discard(self):
        try:
            if self.sink is not None:
                self.sink.close()
        except Exception:
            pass
        for p in self.temp_files():
            try:
                os.remove(p)
            except OSError:
                pass

    def verify(self):
        """Reopen the closed temporary file and read every feature: all that was added must be there."""
        problem = _read_back(self.tmp, self.layer_name, self.sink.added)
        if problem:
            raise QgsProcessingException(f"Writing {self.final} failed ({problem}); {_DISK}")

    def commit(self):
        """Rename the temporary file(s) over the destination: sidecars first, the main file last."""
        tmp_base, final_base = os.path.splitext(self.tmp)[0], os.path.splitext(self.final)[0]
        made = sorted(self.temp_files(), key=lambda p: p == self.tmp)
        suffixes = {p[len(tmp_base):] for p in made}
        for stale in [final_base + s for s in _SIDECARS if s not in suffixes] + [self.final + s for s in _JOURNALS]:
            if os.path.exists(stale):
                os.remove(stale)
        for p in made:
            os.replace(p, final_base + p[len(tmp_base):])


@contextlib.contextmanager
def _gdal_errors():
    """Collect the GDAL errors (CE_Failure and worse) raised in this thread meanwhile: QGIS's file writer
    leaves some of them unreported; GDAL's FutureWarning about QGIS's exceptions choice is not shown."""
    from osgeo import gdal
    errors = []

    def collect(err_class, _err_no, message):
        if err_class >= gdal.CE_Failure:
            errors.append(message)

    gdal.PushErrorHandler(collect)
    try:
        with quiet_osgeo_exceptions_warning():
            yield errors
    finally:
        gdal.PopErrorHandler()


def _read_back(path, layer_name, expected):
    """Open ``path`` read-only with OGR and read every feature; returns what is wrong, or None."""
    from osgeo import ogr
    with _gdal_errors() as errors:
        try:
            ds = ogr.Open(path, 0)
            if ds is None:
                return f"it cannot be read back{': ' + errors[0] if errors else ''}"
            layer = ds.GetLayerByName(layer_name) if ds.GetLayerCount() > 1 else ds.GetLayer(0)
            if layer is None:
                return f"its layer {layer_name} is missing"
            n = sum(1 for _ in layer)  # every feature, geometry and attributes: a page lost on the way fails here
            layer = ds = None
        except Exception as exc:  # osgeo with exceptions enabled
            return f"it cannot be read back: {exc}"
    if n != expected:
        return f"it holds {n} of the {expected} features written"
    if errors:
        return f"it cannot be read back: {errors[0]}"
    return None


class FeatureSinks:
    """The feature-sink outputs of one algorithm run, committed together at the end of the ``with`` block.

    :meth:`create` opens one; leaving the block normally closes and verifies every file output, then renames
    them all into place (none is replaced when one fails); leaving it with an exception removes every temporary
    file. ``results`` then maps each output name to its destination, as ``parameterAsSink`` would return it.
    """

    def __init__(self, alg, parameters, context, transaction=None):
        self.alg, self.parameters, self.context = alg, parameters, context
        self.transaction = transaction
        self.outputs = []
        self.results = {}

    def create(self, name, fields, wkb_type, crs, style=None, required=True):
        """A checked sink for output ``name`` (its ``addFeature`` raises on failure), or None when the optional
        output is not wanted (``required=False``; a required one raises QGIS's invalid-sink error).
        ``style``: a callable returning the post-processor of the layer loaded on completion."""
        value = self.parameters.get(name)
        final = None
        if isinstance(value, (QgsProperty, QgsProcessingOutputLayerDefinition)) or (isinstance(value, str) and value):
            definition = QgsProcessingOutputLayerDefinition(value)
            project, dest_name = definition.destinationProject, definition.destinationName
            definition.destinationProject = None  # no layer to load for the temporary file: the final file is
            params = dict(self.parameters, **{name: definition})
            final = file_destination(self.alg.parameterAsOutputLayer(params, name, self.context))
        if final is None:  # memory:, a database, or unset: written as QGIS does
            sink, dest = self.alg.parameterAsSink(self.parameters, name, self.context, fields, wkb_type, crs)
            if sink is None:
                if required:
                    raise QgsProcessingException(self.alg.invalidSinkError(self.parameters, name))
                return None
            out = _Output(name, dest, style)
            out.sink = _CheckedSink(sink, dest)
            self.outputs.append(out)
            return out.sink
        folder, file_name = os.path.split(final)
        if not os.path.isdir(folder):
            raise QgsProcessingException(f"{name}: the folder {folder} does not exist; create it or choose another "
                                         "location")
        stem, ext = os.path.splitext(file_name)
        tmp = os.path.join(folder, f".{stem}.rsdeep-{uuid.uuid4().hex[:8]}{ext}")
        options = dict(definition.createOptions or {})
        dest = final if not options.get("layerName") else f"{final}|layername={options['layerName']}"
        options.setdefault("layerName", QFileInfo(final).baseName() or stem)  # not the temporary file's name
        definition.sink = QgsProperty.fromValue(tmp)
        definition.createOptions = options
        out = _Output(name, dest, style, final=final, tmp=tmp, layer_name=options["layerName"])
        self.outputs.append(out)
        with _gdal_errors() as errors:
            try:
                sink, _ = self.alg.parameterAsSink(params, name, self.context, fields, wkb_type, crs)
            except QgsProcessingException as exc:
                errors.insert(0, str(exc))
                sink = None
        if sink is not None:
            out.sink = _CheckedSink(sink, final)
        if errors:
            raise QgsProcessingException(f"Cannot create {final} ({errors[0]}); is the disk full or the folder "
                                         "read-only? Free space or choose another output folder")
        if sink is None:
            raise QgsProcessingException(self.alg.invalidSinkError(self.parameters, name))
        if project is not None:
            out.layer_details = QgsProcessingContext.LayerDetails(
                dest_name or self.alg.parameterDefinition(name).description(), project, name,
                QgsProcessingUtils.LayerHint.Vector)
        return out.sink

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            return False
        try:
            for out in self.outputs:
                out.sink.close()
                if out.tmp:
                    out.verify()
            for out in self.outputs:
                if out.tmp:
                    if self.transaction is not None:
                        self.transaction.add(out)  # renamed into place with the run's other outputs
                    else:
                        out.commit()
        except BaseException:
            self._discard()
            raise
        for out in self.outputs:
            self.results[out.name] = out.dest
            if out.layer_details is not None:
                self.context.addLayerToLoadOnCompletion(out.dest, out.layer_details)
            if out.style is not None and self.context.willLoadLayerOnCompletion(out.dest):
                self.context.layerToLoadOnCompletionDetails(out.dest).setPostProcessor(out.style())
        return False

    def _discard(self):
        for out in self.outputs:
            out.discard()


CLASS_POLYGON_FIELDS = (("class_id", "int"), ("class_name", "string"), ("area_m2", "double"), ("mean_prob", "double"))


def write_polygons(sink, fields, records, attributes, feedback, cancelled="Cancelled; no output was written."):
    """Each record's shapely ``geometry`` with ``attributes(record)`` (a list in ``fields``' order) into ``sink``;
    a cancel stops it with ``cancelled``."""
    for rec in records:
        if feedback.isCanceled():
            raise QgsProcessingException(cancelled)
        feat = QgsFeature(fields)
        geom = QgsGeometry()
        geom.fromWkb(rec["geometry"].wkb)
        feat.setGeometry(geom)
        feat.setAttributes(attributes(rec))
        sink.addFeature(feat, QgsFeatureSink.FastInsert)


def write_class_polygons(alg, parameters, context, feedback, transaction, name, records, crs, style):
    """The polygons of a class or change raster (``engine.vectorize`` records) into the feature sink ``name``, with
    class_id, class_name, area_m2 and mean_prob, committed with the run's other outputs (``transaction``);
    ``style``: a callable giving the layer's post-processor. Returns the sink's results."""
    fields = make_fields(*CLASS_POLYGON_FIELDS)
    with FeatureSinks(alg, parameters, context, transaction) as sinks:
        sink = sinks.create(name, fields, QgsWkbTypes.Polygon, crs, style=style)
        write_polygons(sink, fields, records, lambda rec: [rec["class_id"], rec["class_name"],
                                                           round(rec["area_m2"], 3), rec["mean_probability"]], feedback)
    return sinks.results
