"""rs_deep:assess_accuracy — accuracy of a class (or change) raster against reference polygons or a label raster,
or of detected boxes against reference boxes."""
import os

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsFeatureSink,
                       QgsGeometry, QgsPalettedRasterRenderer, QgsProcessing,
                       QgsProcessingException, QgsProcessingOutputNumber, QgsProcessingParameterDefinition,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsRectangle, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields, push_warning
from .base import (FeedbackBridge, NamedEnum, RSDeepAlgorithm, gdal_path, layer_bounds, load_model_package,
                   require_dependencies)
from .outputs import RunOutputs
from .sinks import FeatureSinks

OUTSIDE = ["background (class 0)", "ignore (not counted)"]
OUTSIDE_VALUES = ["background", "ignore"]
BACKGROUND_NAMES = ("background", "other", "none", "no change", "no_change", "unchanged")
ASSESS_TASKS = ["segmentation", "detection", "change"]
ASSESS_TASK_LABELS = ["Semantic segmentation (class raster)", "Object detection (boxes)",
                      "Change detection (change raster)"]


def is_null(value):
    return value is None or (hasattr(value, "isNull") and value.isNull())


def class_value_or_name(value):
    """An attribute as an int class value when it is one (3, 3.0, "3"), else its stripped text."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else str(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            return text
        return int(f) if f.is_integer() else text


def read_labelled_polygons(source, field_name, target_crs, context, feedback, what):
    """Features of ``source`` as ``[(shapely geometry in target_crs, attribute value or None)]``.

    Features without a geometry, or whose ``field_name`` is NULL (reported), are left out."""
    import shapely
    if source is None:
        raise QgsProcessingException(f"{what} is not a valid vector layer")
    field_index = -1
    if field_name:
        field_index = source.fields().lookupField(field_name)
        if field_index < 0:
            names = ", ".join(f.name() for f in source.fields()) or "none"
            raise QgsProcessingException(f"{what} has no field {field_name!r}; its fields: {names}")
    xform = None
    if source.sourceCrs().isValid() and target_crs.isValid() and source.sourceCrs() != target_crs:
        xform = QgsCoordinateTransform(source.sourceCrs(), target_crs, context.transformContext())
    out, nulls = [], 0
    for f in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("Cancelled while reading the features; nothing was written.")
        g = f.geometry()
        if g is None or g.isNull() or g.isEmpty():
            continue
        if g.type() != QgsWkbTypes.PolygonGeometry:
            continue
        value = None
        if field_index >= 0:
            value = f.attributes()[field_index]
            if is_null(value):
                nulls += 1
                continue
        g = QgsGeometry(g)
        if QgsWkbTypes.isCurvedType(g.wkbType()):
            g = QgsGeometry(g.constGet().segmentize())
        if xform is not None:
            try:
                g.transform(xform)
            except Exception as exc:
                raise QgsProcessingException(f"Cannot transform a feature of {what} to the raster's CRS "
                                             f"({target_crs.authid()}): {exc}") from exc
        geom = shapely.from_wkb(bytes(g.asWkb()))
        if geom.is_empty:
            continue
        out.append((geom, value))
    if nulls:
        push_warning(feedback, f"{nulls} feature(s) of {what} have no value in {field_name!r} and were left out")
    if not out:
        raise QgsProcessingException(f"{what} has no polygon feature" + (f" with a value in {field_name!r}"
                                                                        if field_name else "")
                                     + "; give a layer with (multi)polygons")
    return out


def raster_extent_box(layer):
    from shapely.geometry import box
    e = layer.extent()
    return box(e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum())


def check_overlap(pairs, layer, what):
    """Stop with a clear message when no polygon overlaps the raster."""
    area = raster_extent_box(layer)
    if not any(g.intersects(area) for g, _ in pairs):
        e = layer.extent()
        raise QgsProcessingException(
            f"None of the {len(pairs)} features of {what} overlaps the raster {layer.name()} (extent "
            f"{e.xMinimum():.6g}, {e.yMinimum():.6g} : {e.xMaximum():.6g}, {e.yMaximum():.6g} in "
            f"{layer.crs().authid() or 'no CRS'}); check that the features are in the raster's area and that "
            "their layer's CRS is set correctly")


class AssessAccuracyAlgorithm(RSDeepAlgorithm):
    GROUP_ID = "train"
    TASK = "TASK"
    PREDICTION = "PREDICTION"
    PREDICTION_BOXES = "PREDICTION_BOXES"
    PREDICTION_CLASS_FIELD = "PREDICTION_CLASS_FIELD"
    SCORE_FIELD = "SCORE_FIELD"
    IOU_THRESHOLD = "IOU_THRESHOLD"
    SCORE_THRESHOLD = "SCORE_THRESHOLD"
    PRECISION = "PRECISION"
    RECALL = "RECALL"
    F1 = "F1"
    AP = "AP"
    REFERENCE = "REFERENCE"
    CLASS_FIELD = "CLASS_FIELD"
    REFERENCE_RASTER = "REFERENCE_RASTER"
    OUTSIDE = "OUTSIDE"
    MODEL = "MODEL"
    EXTENT = "EXTENT"
    OUTPUT_HTML = "OUTPUT_HTML"
    OUTPUT_TABLE = "OUTPUT_TABLE"
    OVERALL_ACCURACY = "OVERALL_ACCURACY"
    KAPPA = "KAPPA"
    MEAN_IOU = "MEAN_IOU"

    def name(self):
        return "assess_accuracy"

    def displayName(self):  # noqa: N802 (QGIS API)
        return "Assess accuracy"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return (
            "Measures a result against reference labels. <b>Segmentation</b> and <b>change detection</b>: a class "
            "(or change) raster is compared pixel by pixel, giving the confusion matrix, per-class IoU, F1, "
            "precision, recall and support, the overall accuracy, Cohen's kappa and the mean IoU (change: "
            "PRECISION, RECALL and F1 of the change class). <b>Object detection</b>: detected boxes are matched "
            "to reference boxes (greedily by score, IoU threshold), giving precision, recall, F1 and AP.<br><br>"
            "<b>Task</b>: what is assessed.<br>"
            "<b>Prediction</b>: segmentation and change: a class raster (file), band 1 holding integer class "
            "values (the output of Semantic segmentation or Change detection). Its nodata pixels are not "
            "counted.<br>"
            "<b>Predicted boxes</b>: detection: the boxes layer (the output of Object detection); each feature's "
            "bounding box is compared. <b>Score field</b> (default: score, if the layer has it) orders them and "
            "<b>Score threshold</b> drops the weaker ones; <b>Predicted class field</b> (default: class_name) "
            "is compared with the reference's class field. Without a reference class field the classes are "
            "ignored. <b>IoU threshold</b>: the overlap a match needs (default 0.5).<br>"
            "<b>Reference polygons</b>: polygons of the true classes (reprojected to the prediction's CRS). "
            "Give either these or a reference raster.<br>"
            "<b>Class field</b>: the field of the reference polygons holding each polygon's class: a class value "
            "(integer) or a class name, matched (case-insensitive) against the prediction's category names, its "
            "style's labels or the model's classes. Without it, every polygon is the prediction's only "
            "non-background class.<br>"
            "<b>Reference raster</b>: a label raster of class values; resampled (nearest) onto the prediction's "
            "grid when its grid differs. Its nodata pixels are not counted.<br>"
            "<b>Outside the polygons</b>: pixels outside every reference polygon are the background (class 0) or "
            "are not counted (when only part of the objects was labelled).<br>"
            "<b>Model package</b>: optional; names the classes (for class names in the class field and the "
            "report) when the prediction raster does not.<br>"
            "<b>Extent</b>: assess only this area (default: the whole prediction).<br>"
            "<b>Report</b>: a self-contained HTML page with the summary, the per-class table and the confusion "
            "matrix (rows: reference, columns: prediction).<br>"
            "<b>Per-class table</b>: a table without geometry, one row per class: class_id, class_name, iou, f1, "
            "precision, recall, support (reference pixels). Metrics that are undefined (no pixel of the class) "
            "are NULL.<br>"
            "Also returned: OVERALL_ACCURACY, KAPPA and MEAN_IOU (the mean over the classes present in the "
            "reference or the prediction); PRECISION, RECALL, F1 (change: of the change classes; detection: of "
            "the boxes) and AP (detection). Detection writes one summary row."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS API)
        self.addParameter(NamedEnum(self.TASK, "Task", ASSESS_TASK_LABELS, ASSESS_TASKS, defaultValue=0))
        self.addParameter(QgsProcessingParameterRasterLayer(self.PREDICTION, "Prediction (class or change raster)",
                                                            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.PREDICTION_BOXES, "Predicted boxes (detection)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(self.REFERENCE, "Reference polygons",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, "Class field (value or name)", None,
                                                      self.REFERENCE, QgsProcessingParameterField.Any,
                                                      optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(self.REFERENCE_RASTER, "Reference raster (class values)",
                                                            optional=True))
        self.addParameter(NamedEnum(self.OUTSIDE, "Outside the reference polygons", OUTSIDE, OUTSIDE_VALUES,
                                    defaultValue=0))
        advanced = [
            QgsProcessingParameterFile(self.MODEL, "Model package (names the classes; optional)",
                                       behavior=QgsProcessingParameterFile.Folder, optional=True),
            QgsProcessingParameterExtent(self.EXTENT, "Extent", optional=True),
            QgsProcessingParameterField(self.SCORE_FIELD, "Score field of the predicted boxes", None,
                                        self.PREDICTION_BOXES, QgsProcessingParameterField.Numeric, optional=True),
            QgsProcessingParameterField(self.PREDICTION_CLASS_FIELD, "Class field of the predicted boxes", None,
                                        self.PREDICTION_BOXES, QgsProcessingParameterField.Any, optional=True),
            QgsProcessingParameterNumber(self.IOU_THRESHOLD, "IoU threshold (detection)",
                                         QgsProcessingParameterNumber.Double, 0.5, optional=True, minValue=0.01,
                                         maxValue=1.0),
            QgsProcessingParameterNumber(self.SCORE_THRESHOLD, "Score threshold (detection)",
                                         QgsProcessingParameterNumber.Double, 0.0, optional=True, minValue=0.0,
                                         maxValue=1.0),
        ]
        for p in advanced:
            p.setFlags(p.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(p)
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_HTML, "Accuracy report",
                                                                "HTML files (*.html)", optional=True,
                                                                createByDefault=True))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT_TABLE, "Per-class accuracy",
                                                            QgsProcessing.TypeVector, optional=True,
                                                            createByDefault=True))
        self.addOutput(QgsProcessingOutputNumber(self.OVERALL_ACCURACY, "Overall accuracy"))
        self.addOutput(QgsProcessingOutputNumber(self.KAPPA, "Cohen's kappa"))
        self.addOutput(QgsProcessingOutputNumber(self.MEAN_IOU, "Mean IoU"))
        self.addOutput(QgsProcessingOutputNumber(self.PRECISION, "Precision"))
        self.addOutput(QgsProcessingOutputNumber(self.RECALL, "Recall"))
        self.addOutput(QgsProcessingOutputNumber(self.F1, "F1"))
        self.addOutput(QgsProcessingOutputNumber(self.AP, "Average precision (detection)"))

    # ----------------------------------------------------------------------------------------

    def _class_names(self, parameters, context, layer, path, feedback):
        """{value: name} from the model package, else the raster's category names, else its paletted style."""
        from ..rs_deep_plugin.engine.evaluation.accuracy import raster_category_names
        model = self.parameterAsFile(parameters, self.MODEL, context) if parameters.get(self.MODEL) else ""
        if model:
            pkg = load_model_package(model, None)
            feedback.pushInfo(f"Class names from the model package {pkg.name}")
            return {c.value: c.name for c in pkg.classes}
        names = raster_category_names(path)
        if names:
            return names
        renderer = layer.renderer()
        if isinstance(renderer, QgsPalettedRasterRenderer):
            return {int(c.value): c.label for c in renderer.classes() if c.label}
        return {}

    @staticmethod
    def _to_class_value(raw, names, field):
        value = class_value_or_name(raw)
        if isinstance(value, int):
            return value
        lookup = {n.strip().lower(): v for v, n in names.items()}
        hit = lookup.get(value.lower())
        if hit is None:
            known = ", ".join(f"{v}={n}" for v, n in sorted(names.items())) or "none (the prediction names no classes)"
            raise QgsProcessingException(
                f"Class {value!r} in field {field!r} is neither a class value nor one of the prediction's class names "
                f"({known}); use class values, or give the MODEL that names the classes")
        return hit

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS API)
        require_dependencies()
        task = self.parameterAsEnumName(parameters, self.TASK, context) \
            if parameters.get(self.TASK) not in (None, "") else "segmentation"
        with RunOutputs(self, parameters, context, feedback) as outputs:  # the report and table, both or none
            if task == "detection":
                return self._assess_detection(parameters, context, feedback, outputs)
            return self._assess_raster(task, parameters, context, feedback, outputs)

    def _assess_raster(self, task, parameters, context, feedback, outputs):
        from ..rs_deep_plugin.engine.evaluation.accuracy import assess_segmentation, write_report
        from ..rs_deep_plugin.engine.errors import Cancelled, RSDeepError
        layer = self.parameterAsRasterLayer(parameters, self.PREDICTION, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"PREDICTION is not set or not a valid raster layer; choose the "
                                         f"{'change' if task == 'change' else 'class'} raster to assess"
                                         + (" (for boxes, set TASK to Object detection and give PREDICTION_BOXES)"
                                            if parameters.get(self.PREDICTION_BOXES) not in (None, "") else ""))
        path = gdal_path(layer)
        if path is None:
            raise QgsProcessingException(f"PREDICTION {layer.name()} is not a raster file ({layer.providerType()}); "
                                         "save it as a GeoTIFF first (Export > Save As...)")
        source = self.parameterAsSource(parameters, self.REFERENCE, context)
        ref_layer = self.parameterAsRasterLayer(parameters, self.REFERENCE_RASTER, context) \
            if parameters.get(self.REFERENCE_RASTER) not in (None, "") else None
        if (source is None) == (ref_layer is None):
            raise QgsProcessingException("Give the reference as either REFERENCE (polygons with a class field) or "
                                         "REFERENCE_RASTER (a label raster), not both and not neither")
        field = self.parameterAsString(parameters, self.CLASS_FIELD, context) if source is not None else ""
        outside = self.parameterAsEnumName(parameters, self.OUTSIDE, context)
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
        bounds = layer_bounds(layer, extent)
        names = self._class_names(parameters, context, layer, path, feedback)
        html_path = self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context) \
            if parameters.get(self.OUTPUT_HTML) not in (None, "") else ""

        if source is not None:
            pairs = read_labelled_polygons(source, field, layer.crs(), context, feedback, "REFERENCE")
            check_overlap(pairs, layer, "REFERENCE")
            if field:
                reference = [(g, self._to_class_value(v, names, field)) for g, v in pairs]
            else:
                fg = [v for v, n in names.items() if v != 0 and n.strip().lower() not in BACKGROUND_NAMES]
                if len(fg) > 1:
                    raise QgsProcessingException(
                        f"The prediction has {len(fg)} non-background classes "
                        f"({', '.join(names[v] for v in fg)}): choose the CLASS_FIELD that holds each polygon's "
                        "class")
                value = fg[0] if fg else 1
                feedback.pushInfo(f"No class field: every polygon is class {value} ({names.get(value, 'class 1')})")
                reference = [(g, value) for g, _ in pairs]
            feedback.pushInfo(f"Reference: {len(reference)} polygons; outside them: {outside}")
        else:
            if not ref_layer.isValid():
                raise QgsProcessingException("REFERENCE_RASTER is not a valid raster layer")
            reference = gdal_path(ref_layer)
            if reference is None:
                raise QgsProcessingException(f"REFERENCE_RASTER {ref_layer.name()} is not a raster file; save it as "
                                             "a GeoTIFF first")
            feedback.pushInfo(f"Reference raster: {reference}")

        bridge = FeedbackBridge(feedback, 0, 90)
        try:
            metrics = assess_segmentation(path, reference, class_names=names or None, bounds=bounds, outside=outside,
                                          progress=bridge.progress, is_cancelled=bridge.is_cancelled)
        except Cancelled as exc:
            raise QgsProcessingException("Cancelled; nothing was written.") from exc
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc

        feedback.pushInfo(f"{metrics['pixels']:,} pixels compared: overall accuracy {metrics['overall_accuracy']:.4f}, "
                          f"kappa {metrics['kappa']:.4f}, mean IoU {_f(metrics['mean_iou'])}")
        for c in metrics["classes"]:
            feedback.pushInfo(f"  {c['value']} {c['name']}: IoU {_f(c['iou'])}, F1 {_f(c['f1'])}, precision "
                              f"{_f(c['precision'])}, recall {_f(c['recall'])}, support {c['support']:,} px")
        results = {self.OVERALL_ACCURACY: metrics["overall_accuracy"], self.KAPPA: metrics["kappa"],
                   self.MEAN_IOU: metrics["mean_iou"], self.F1: metrics["mean_f1"]}
        if task == "change":
            change = _change_scores(metrics)
            results.update({self.PRECISION: change["precision"], self.RECALL: change["recall"],
                            self.F1: change["f1"]})
            metrics["change"] = change
            feedback.pushInfo(f"Change ({change['classes']}): precision {_f(change['precision'])}, recall "
                              f"{_f(change['recall'])}, F1 {_f(change['f1'])}, IoU {_f(change['iou'])}")
        if html_path:
            try:
                write_report(metrics, html_path=html_path, transaction=outputs.transaction,
                             title=f"{'Change detection accuracy' if task == 'change' else 'Accuracy'} of "
                                   f"{os.path.basename(path)}")
            except (OSError, RSDeepError) as exc:
                raise QgsProcessingException(f"Cannot write the report {html_path}: {exc}") from exc
            results[self.OUTPUT_HTML] = html_path
        if parameters.get(self.OUTPUT_TABLE) not in (None, ""):
            fields = make_fields(("class_id", "int"), ("class_name", "string"),
                                 *[(n, "double") for n in ("iou", "f1", "precision", "recall")], ("support", "int64"))
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                sink = sinks.create(self.OUTPUT_TABLE, fields, QgsWkbTypes.NoGeometry, QgsCoordinateReferenceSystem())
                for c in metrics["classes"]:
                    feat = QgsFeature(fields)
                    feat.setAttributes([c["value"], c["name"], c["iou"], c["f1"], c["precision"], c["recall"],
                                        c["support"]])
                    sink.addFeature(feat, QgsFeatureSink.FastInsert)
            results.update(sinks.results)
        feedback.setProgress(100)
        return results

    def _assess_detection(self, parameters, context, feedback, outputs):
        """Detected boxes (a vector layer) against reference boxes (polygons: their bounding boxes)."""
        from ..rs_deep_plugin.engine.evaluation.accuracy import assess_detection, write_report
        from ..rs_deep_plugin.engine.errors import RSDeepError
        pred = self.parameterAsSource(parameters, self.PREDICTION_BOXES, context)
        if pred is None:
            raise QgsProcessingException("Detection: give PREDICTION_BOXES, the boxes layer written by Object "
                                         "detection (or any polygon layer of boxes)")
        source = self.parameterAsSource(parameters, self.REFERENCE, context)
        if source is None:
            raise QgsProcessingException("Detection: give REFERENCE, the polygons (or boxes) of the true objects")
        crs = pred.sourceCrs()
        ref_field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
        pred_fields = [f.name() for f in pred.fields()]
        score_field = self.parameterAsString(parameters, self.SCORE_FIELD, context) or \
            ("score" if "score" in pred_fields else "")
        class_field = self.parameterAsString(parameters, self.PREDICTION_CLASS_FIELD, context) or \
            ("class_name" if ref_field and "class_name" in pred_fields else "")
        if ref_field and not class_field:
            raise QgsProcessingException(f"CLASS_FIELD {ref_field!r} is set but the predicted boxes have no "
                                         "class_name field: set PREDICTION_CLASS_FIELD, or leave CLASS_FIELD empty "
                                         "to ignore the classes")
        iou = self.parameterAsDouble(parameters, self.IOU_THRESHOLD, context) \
            if parameters.get(self.IOU_THRESHOLD) not in (None, "") else 0.5
        score_t = self.parameterAsDouble(parameters, self.SCORE_THRESHOLD, context) \
            if parameters.get(self.SCORE_THRESHOLD) not in (None, "") else 0.0
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, crs)
        area = None if extent is None or extent.isNull() or extent.isEmpty() else QgsRectangle(extent)

        def label(value):
            v = class_value_or_name(value)
            return str(v).strip().lower()

        def inside(b):
            return area is None or area.contains((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)

        refs = read_labelled_polygons(source, ref_field, crs, context, feedback, "REFERENCE")
        reference = [tuple(g.bounds) + ((label(v) if ref_field else 0),) for g, v in refs]
        reference = [r for r in reference if inside(r)]
        predicted, missing_score = [], 0
        for f in pred.getFeatures():
            if feedback.isCanceled():
                raise QgsProcessingException("Cancelled; nothing was written.")
            g = f.geometry()
            if g is None or g.isNull() or g.isEmpty():
                continue
            r = g.boundingBox()
            b = (r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum())
            if not inside(b):
                continue
            score = f[score_field] if score_field else 1.0
            if is_null(score):
                missing_score += 1
                continue
            cls = (label(f[class_field]) if class_field and not is_null(f[class_field]) else 0) if ref_field else 0
            predicted.append(b + (cls, float(score)))
        if missing_score:
            push_warning(feedback, f"{missing_score} predicted box(es) have no {score_field!r} and were left out")
        if not reference:
            raise QgsProcessingException("REFERENCE has no box in the assessed area; check the extent and the "
                                         "layer's CRS")
        feedback.pushInfo(f"{len(predicted)} predicted boxes (score field: {score_field or 'none, all 1'}) against "
                          f"{len(reference)} reference boxes; IoU >= {iou:g}, score >= {score_t:g}; classes "
                          + ("compared" if ref_field else "ignored"))
        try:
            metrics = assess_detection(predicted, reference, iou=iou, score_threshold=score_t)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        feedback.pushInfo(f"precision {_f(metrics['precision'])}, recall {_f(metrics['recall'])}, F1 "
                          f"{_f(metrics['f1'])}, AP{int(round(iou * 100))} {_f(metrics['ap'])} "
                          f"(TP {metrics['tp']}, FP {metrics['fp']}, FN {metrics['fn']})")
        results = {self.PRECISION: metrics["precision"], self.RECALL: metrics["recall"], self.F1: metrics["f1"],
                   self.AP: metrics["ap"]}
        html_path = self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context) \
            if parameters.get(self.OUTPUT_HTML) not in (None, "") else ""
        if html_path:
            try:
                write_report(metrics, html_path=html_path, title=f"Detection accuracy of {pred.sourceName()}",
                             transaction=outputs.transaction)
            except (OSError, RSDeepError) as exc:
                raise QgsProcessingException(f"Cannot write the report {html_path}: {exc}") from exc
            results[self.OUTPUT_HTML] = html_path
        if parameters.get(self.OUTPUT_TABLE) not in (None, ""):
            from ..rs_deep_plugin.engine.evaluation.accuracy import DETECTION_FIELDS
            fields = make_fields(*[(n, "int" if n in ("tp", "fp", "fn", "truth", "predicted") else "double")
                                   for n in DETECTION_FIELDS])
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                sink = sinks.create(self.OUTPUT_TABLE, fields, QgsWkbTypes.NoGeometry, QgsCoordinateReferenceSystem())
                feat = QgsFeature(fields)
                feat.setAttributes([metrics.get(n) for n in DETECTION_FIELDS])
                sink.addFeature(feat, QgsFeatureSink.FastInsert)
            results.update(sinks.results)
        feedback.setProgress(100)
        return results


def _f(v):
    return "n/a" if v is None else f"{v:.4f}"


def _change_scores(metrics):
    """Precision, recall, F1, IoU of 'changed' (every class but 0) against 'not changed', from the confusion matrix."""
    cm = metrics["confusion_matrix"]
    n = len(cm)
    tp = sum(cm[i][j] for i in range(1, n) for j in range(1, n))
    fp = sum(cm[0][j] for j in range(1, n))
    fn = sum(cm[i][0] for i in range(1, n))

    def ratio(a, b):
        return a / b if b else None

    names = metrics.get("class_names") or []
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn), "tp": tp, "fp": fp, "fn": fn,
            "classes": ", ".join(names[1:]) or "change"}
