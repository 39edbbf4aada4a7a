"""rs_deep:assess_accuracy — accuracy of a class (or change) raster against reference polygons or a label raster,
or of detected boxes against reference boxes."""
import os

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsFeatureSink, QgsPalettedRasterRenderer,
                       QgsProcessing, QgsProcessingException, QgsProcessingOutputNumber,
                       QgsProcessingParameterExtent, QgsProcessingParameterFeatureSink,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber,
                       QgsRectangle, QgsWkbTypes)

from ..rs_deep_plugin.compat import make_fields
from ..rs_deep_plugin.engine.tasks import CHANGE, DETECTION, INSTANCE_SEGMENTATION, PATCH_CLASSIFICATION, SEGMENTATION
from .base import FeedbackBridge, NamedEnum, RSDeepAlgorithm
from .labels import class_value, only_foreground_class
from .layers import (check_overlap, gdal_path, predicted_boxes, predicted_patches, read_labelled_polygons,
                     reference_boxes)
from .outputs import RunOutputs
from .params import EXTENT, MODEL, RasterInput, add, extent_bounds, load_model_package, number_or, read_raster_layer
from .sinks import FeatureSinks

TASK = "TASK"
ASSESSED = [(SEGMENTATION, "class raster"), (DETECTION, "boxes"), (CHANGE, "change raster"),
            (PATCH_CLASSIFICATION, "multi-label patches")]  # TASK's choices
#: the last choice of TASK: rotated boxes (an oriented detector's), matched by rotated IoU
ORIENTED = "oriented_detection"
ORIENTED_LABEL = "Oriented object detection (rotated boxes)"
#: and after it: instance polygons (rs_deep:segment_instances'), matched by polygon (mask) IoU
INSTANCES = INSTANCE_SEGMENTATION.name
INSTANCES_LABEL = "Instance segmentation (object polygons)"
#: a predicted feature is a rotated box when its area is below this share of its bounding box's
ROTATED_AREA_SHARE = 0.98
# a class or change raster against reference polygons or a reference raster
PREDICTION = "PREDICTION"
REFERENCE = "REFERENCE"
CLASS_FIELD = "CLASS_FIELD"
REFERENCE_RASTER = "REFERENCE_RASTER"
OUTSIDE = "OUTSIDE"
OUTSIDE_CHOICES = {"background": "background (class 0)", "ignore": "ignore (not counted)"}
# detected boxes against the reference polygons' boxes
PREDICTION_BOXES = "PREDICTION_BOXES"
SCORE_FIELD = "SCORE_FIELD"
PREDICTION_CLASS_FIELD = "PREDICTION_CLASS_FIELD"
IOU_THRESHOLD = "IOU_THRESHOLD"
SCORE_THRESHOLD = "SCORE_THRESHOLD"
# multi-label patches against the reference polygons
LABEL_COVER = "LABEL_COVER"
COVER_DEFAULT = 0.2
# what is written and returned
OUTPUT_HTML = "OUTPUT_HTML"
OUTPUT_TABLE = "OUTPUT_TABLE"
NUMBERS = {"OVERALL_ACCURACY": "Overall accuracy", "KAPPA": "Cohen's kappa", "MEAN_IOU": "Mean IoU",
           "PRECISION": "Precision", "RECALL": "Recall", "F1": "F1", "AP": "Average precision (detection)",
           "MICRO_F1": "Micro F1 (multi-label)", "MACRO_F1": "Macro F1 (multi-label)"}


class AssessAccuracyAlgorithm(RSDeepAlgorithm):
    NAME, DISPLAY_NAME, GROUP_ID = "assess_accuracy", "Assess accuracy", "train"

    def shortHelpString(self):  # noqa: N802 (QGIS API)
        return (
            "Measures a result against reference labels. <b>Segmentation</b> and <b>change detection</b>: a class "
            "(or change) raster is compared pixel by pixel, giving the confusion matrix, per-class IoU, F1, "
            "precision, recall and support, the overall accuracy, Cohen's kappa and the mean IoU (change: "
            "PRECISION, RECALL and F1 of the change class). <b>Object detection</b>: detected boxes are matched "
            "to reference boxes (greedily by score, IoU threshold), giving precision, recall, F1 and AP. <b>Oriented "
            "object detection</b>: the rotated rectangles of an oriented model (CenterNetOBB) against the minimum "
            "rotated rectangles of the reference polygons, matched by rotated IoU. <b>Instance segmentation</b> "
            "(TASK=instance_segmentation): the object polygons of Instance segmentation against the reference "
            "polygons themselves, matched by polygon (mask) IoU.<br><br>"
            "<b>Task</b>: what is assessed.<br>"
            "<b>Prediction</b>: segmentation and change: a class raster (file), band 1 holding integer class "
            "values (the output of Semantic segmentation or Change detection). Its nodata pixels are not "
            "counted.<br>"
            "<b>Predicted boxes</b>: detection: the boxes layer (the output of Object detection); each feature's "
            "bounding box is compared. <b>Score field</b> (default: score, if the layer has it) orders them and "
            "<b>Score threshold</b> drops the weaker ones; <b>Predicted class field</b> (default: class_name) "
            "is compared with the reference's class field. Without a reference class field the classes are "
            "ignored. <b>IoU threshold</b>: the overlap a match needs (default 0.5).<br>"
            "<b>Multi-label patch classification</b>: the patches written by Patch classification with a "
            "multi-label model (PREDICTION_BOXES: the patch layer; PREDICTION_CLASS_FIELD: its comma-separated "
            "labels, default labels) against REFERENCE polygons with their class names in CLASS_FIELD: a patch's "
            f"true labels are the classes whose polygons cover at least LABEL_COVER (default {COVER_DEFAULT:g}) of "
            "its area, as rs_deep:train labels the training patches. Per class: precision, recall, F1 over the "
            "patches; MICRO_F1 pools the counts of every class (also PRECISION, RECALL, F1), MACRO_F1 averages the "
            "classes' F1.<br>"
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
        self.addParameter(NamedEnum(TASK, "Task", [f"{t.label} ({what})" for t, what in ASSESSED]
                                    + [ORIENTED_LABEL, INSTANCES_LABEL],
                                    [t.name for t, _ in ASSESSED] + [ORIENTED, INSTANCES], defaultValue=0))
        self.addParameter(RasterInput(PREDICTION, "Prediction (class or change raster)", optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(PREDICTION_BOXES,
                                                              "Predicted boxes (detection) or patches (multi-label)",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(REFERENCE, "Reference polygons",
                                                              [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField(CLASS_FIELD, "Class field (value or name)", None, REFERENCE,
                                                      QgsProcessingParameterField.Any, optional=True))
        self.addParameter(RasterInput(REFERENCE_RASTER, "Reference raster (class values)", optional=True))
        self.addParameter(NamedEnum(OUTSIDE, "Outside the reference polygons", list(OUTSIDE_CHOICES.values()),
                                    list(OUTSIDE_CHOICES), defaultValue=0))
        double = QgsProcessingParameterNumber.Double
        for p in (QgsProcessingParameterFile(MODEL, "Model package (names the classes; optional)",
                                             behavior=QgsProcessingParameterFile.Folder, optional=True),
                  QgsProcessingParameterExtent(EXTENT, "Extent", optional=True),
                  QgsProcessingParameterField(SCORE_FIELD, "Score field of the predicted boxes", None, PREDICTION_BOXES,
                                              QgsProcessingParameterField.Numeric, optional=True),
                  QgsProcessingParameterField(PREDICTION_CLASS_FIELD, "Class field of the predicted boxes", None,
                                              PREDICTION_BOXES, QgsProcessingParameterField.Any, optional=True),
                  QgsProcessingParameterNumber(IOU_THRESHOLD, "IoU threshold (detection)", double, 0.5, optional=True,
                                               minValue=0.01, maxValue=1.0),
                  QgsProcessingParameterNumber(SCORE_THRESHOLD, "Score threshold (detection)", double, 0.0,
                                               optional=True, minValue=0.0, maxValue=1.0),
                  QgsProcessingParameterNumber(LABEL_COVER, "Label cover (multi-label: share of a patch a class must "
                                               "cover)", double, COVER_DEFAULT, optional=True, minValue=0.0,
                                               maxValue=1.0)):
            add(self, p, advanced=True)
        self.addParameter(QgsProcessingParameterFileDestination(OUTPUT_HTML, "Accuracy report", "HTML files (*.html)",
                                                                optional=True, createByDefault=True))
        self.addParameter(QgsProcessingParameterFeatureSink(OUTPUT_TABLE, "Per-class accuracy",
                                                            QgsProcessing.TypeVector, optional=True,
                                                            createByDefault=True))
        for name, description in NUMBERS.items():
            self.addOutput(QgsProcessingOutputNumber(name, description))

    def process(self, parameters, context, feedback):
        task = self.parameterAsEnumName(parameters, TASK, context) \
            if parameters.get(TASK) not in (None, "") else SEGMENTATION.name
        with RunOutputs(self, parameters, context, feedback) as outputs:  # the report and table, both or none
            if task in (DETECTION.name, ORIENTED, INSTANCES):
                return self._assess_detection(parameters, context, feedback, outputs, rotated=task == ORIENTED,
                                              masks=task == INSTANCES)
            if task == PATCH_CLASSIFICATION.name:
                return self._assess_multilabel(parameters, context, feedback, outputs)
            return self._assess_raster(task, parameters, context, feedback, outputs)

    # -- a class or change raster ------------------------------------------------------------------------------------

    def _class_names(self, parameters, context, layer, path, feedback):
        """{value: name} from the model package, else the raster's category names, else its paletted style."""
        from ..rs_deep_plugin.engine.evaluation.accuracy import raster_category_names
        model = self.parameterAsFile(parameters, MODEL, context) if parameters.get(MODEL) else ""
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

    def _assess_raster(self, task, parameters, context, feedback, outputs):
        from ..rs_deep_plugin.engine.evaluation.accuracy import assess_segmentation
        from ..rs_deep_plugin.engine.evaluation.metrics import change_scores
        layer = read_raster_layer(self, parameters, PREDICTION, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"PREDICTION is not set or not a valid raster layer; choose the "
                                         f"{'change' if task == CHANGE.name else 'class'} raster to assess"
                                         + (" (for boxes, set TASK to Object detection and give PREDICTION_BOXES)"
                                            if parameters.get(PREDICTION_BOXES) not in (None, "") else ""))
        path = gdal_path(layer)
        if path is None:
            raise QgsProcessingException(f"PREDICTION {layer.name()} is not a raster file ({layer.providerType()}); "
                                         "save it as a GeoTIFF first (Export > Save As...)")
        source = self.parameterAsSource(parameters, REFERENCE, context)
        ref_layer = read_raster_layer(self, parameters, REFERENCE_RASTER, context) \
            if parameters.get(REFERENCE_RASTER) not in (None, "") else None
        if (source is None) == (ref_layer is None):
            raise QgsProcessingException("Give the reference as either REFERENCE (polygons with a class field) or "
                                         "REFERENCE_RASTER (a label raster), not both and not neither")
        field = self.parameterAsString(parameters, CLASS_FIELD, context) if source is not None else ""
        outside = self.parameterAsEnumName(parameters, OUTSIDE, context)
        bounds = extent_bounds(self.parameterAsExtent(parameters, EXTENT, context, layer.crs()))
        names = self._class_names(parameters, context, layer, path, feedback)
        if source is not None:
            reference = self._reference_polygons(source, field, layer, names, context, feedback)
            feedback.pushInfo(f"Reference: {len(reference)} polygons; outside them: {outside}")
        else:
            reference = self._reference_raster(ref_layer, feedback)

        bridge = FeedbackBridge(feedback, 0, 90)
        metrics = assess_segmentation(path, reference, class_names=names or None, bounds=bounds, outside=outside,
                                      progress=bridge.progress, is_cancelled=bridge.is_cancelled)
        feedback.pushInfo(f"{metrics['pixels']:,} pixels compared: overall accuracy {metrics['overall_accuracy']:.4f}, "
                          f"kappa {metrics['kappa']:.4f}, mean IoU {_f(metrics['mean_iou'])}")
        for c in metrics["classes"]:
            feedback.pushInfo(f"  {c['value']} {c['name']}: IoU {_f(c['iou'])}, F1 {_f(c['f1'])}, precision "
                              f"{_f(c['precision'])}, recall {_f(c['recall'])}, support {c['support']:,} px")
        results = dict(OVERALL_ACCURACY=metrics["overall_accuracy"], KAPPA=metrics["kappa"],
                       MEAN_IOU=metrics["mean_iou"], F1=metrics["mean_f1"])
        if task == CHANGE.name:
            change = metrics["change"] = change_scores(metrics["confusion_matrix"], metrics.get("class_names"))
            results.update(PRECISION=change["precision"], RECALL=change["recall"], F1=change["f1"])
            feedback.pushInfo(f"Change ({change['classes']}): precision {_f(change['precision'])}, recall "
                              f"{_f(change['recall'])}, F1 {_f(change['f1'])}, IoU {_f(change['iou'])}")
        title = f"{'Change detection accuracy' if task == CHANGE.name else 'Accuracy'} of {os.path.basename(path)}"
        fields = make_fields(("class_id", "int"), ("class_name", "string"),
                             *[(n, "double") for n in ("iou", "f1", "precision", "recall")], ("support", "int64"))
        rows = [[c["value"], c["name"], c["iou"], c["f1"], c["precision"], c["recall"], c["support"]]
                for c in metrics["classes"]]
        results.update(self._write(parameters, context, outputs, metrics, title, fields, rows))
        return results

    @staticmethod
    def _reference_polygons(source, field, layer, names, context, feedback):
        """REFERENCE as ``[(geometry in the prediction's CRS, class value)]``."""
        pairs = read_labelled_polygons(source, field, layer.crs(), context, feedback, "REFERENCE")
        check_overlap(pairs, layer, "REFERENCE")
        if field:
            return [(g, class_value(v, names, field)) for g, v in pairs]
        value = only_foreground_class(names)
        feedback.pushInfo(f"No class field: every polygon is class {value} ({names.get(value, 'class 1')})")
        return [(g, value) for g, _ in pairs]

    @staticmethod
    def _reference_raster(ref_layer, feedback):
        if not ref_layer.isValid():
            raise QgsProcessingException("REFERENCE_RASTER is not a valid raster layer")
        reference = gdal_path(ref_layer)
        if reference is None:
            raise QgsProcessingException(f"REFERENCE_RASTER {ref_layer.name()} is not a raster file; save it as "
                                         "a GeoTIFF first")
        feedback.pushInfo(f"Reference raster: {reference}")
        return reference

    # -- detected boxes ----------------------------------------------------------------------------------------------

    @staticmethod
    def _rotated_boxes(pred):
        """How many features of ``pred`` are rotated rectangles (area well below their bounding box's), of how many
        looked at (the first 200)."""
        rotated = seen = 0
        for f in pred.getFeatures():
            g = f.geometry()
            if g is None or g.isNull() or g.isEmpty():
                continue
            r = g.boundingBox()
            seen += 1
            if r.area() > 0 and g.area() < ROTATED_AREA_SHARE * r.area():
                rotated += 1
            if seen >= 200:
                break
        return rotated, seen

    def _assess_detection(self, parameters, context, feedback, outputs, rotated=False, masks=False):
        """Detected boxes (a vector layer) against reference boxes (polygons: their bounding boxes; ``rotated``:
        their minimum rotated rectangles, matched by rotated IoU; ``masks``: instance polygons against the reference
        polygons themselves, matched by polygon IoU)."""
        from ..rs_deep_plugin.engine.errors import RSDeepError
        from ..rs_deep_plugin.engine.evaluation.accuracy import DETECTION_FIELDS, assess_detection
        pred, source, area = self._vector_inputs(
            parameters, context, "Detection", "the boxes layer written by Object detection (or any polygon layer of "
            "boxes)", "the polygons (or boxes) of the true objects")
        crs = pred.sourceCrs()
        ref_field = self.parameterAsString(parameters, CLASS_FIELD, context)
        pred_fields = [f.name() for f in pred.fields()]
        if not rotated and "angle" in pred_fields:
            n_rot, seen = self._rotated_boxes(pred)
            if n_rot:
                raise QgsProcessingException(
                    f"PREDICTION_BOXES holds rotated boxes (an angle field; {n_rot} of the first {seen} features are "
                    "rotated rectangles, the output of an oriented model): an axis-aligned assessment would compare "
                    "their bounding boxes. Set TASK to oriented_detection (Oriented object detection) to match them "
                    "by rotated IoU")
        score_field = self.parameterAsString(parameters, SCORE_FIELD, context) or \
            ("score" if "score" in pred_fields else "")
        own_class = "class" if masks and "class" in pred_fields else "class_name"  # segment_instances: class
        class_field = self.parameterAsString(parameters, PREDICTION_CLASS_FIELD, context) or \
            (own_class if ref_field and own_class in pred_fields else "")
        if ref_field and not class_field:
            raise QgsProcessingException(f"CLASS_FIELD {ref_field!r} is set but the predicted boxes have no "
                                         "class_name field: set PREDICTION_CLASS_FIELD, or leave CLASS_FIELD empty "
                                         "to ignore the classes")
        iou = number_or(self, parameters, IOU_THRESHOLD, context, 0.5)
        score_t = number_or(self, parameters, SCORE_THRESHOLD, context, 0.0)

        reference = reference_boxes(source, ref_field, crs, area, context, feedback, shapes=rotated or masks)
        predicted = predicted_boxes(pred, score_field, class_field if ref_field else "", area, feedback,
                                    shapes=rotated or masks)
        if not reference:
            raise QgsProcessingException("REFERENCE has no box in the assessed area; check the extent and the "
                                         "layer's CRS")
        kind = "polygons" if masks else "rotated boxes" if rotated else "boxes"
        feedback.pushInfo(f"{len(predicted)} predicted {kind} (score field: {score_field or 'none, all 1'}) "
                          f"against {len(reference)} reference {kind}"
                          + (" (minimum rotated rectangles)" if rotated else "")
                          + f"; {'polygon (mask) ' if masks else 'rotated ' if rotated else ''}IoU >= {iou:g}, "
                          f"score >= {score_t:g}; classes " + ("compared" if ref_field else "ignored"))
        try:
            metrics = assess_detection(predicted, reference, iou=iou, score_threshold=score_t, rotated=rotated,
                                       masks=masks)
        except RSDeepError as exc:
            raise QgsProcessingException(str(exc)) from exc
        feedback.pushInfo(f"precision {_f(metrics['precision'])}, recall {_f(metrics['recall'])}, F1 "
                          f"{_f(metrics['f1'])}, AP{int(round(iou * 100))} {_f(metrics['ap'])} "
                          f"(TP {metrics['tp']}, FP {metrics['fp']}, FN {metrics['fn']})")
        results = dict(PRECISION=metrics["precision"], RECALL=metrics["recall"], F1=metrics["f1"], AP=metrics["ap"])
        fields = make_fields(*[(n, "int" if n in ("tp", "fp", "fn", "truth", "predicted") else "double")
                               for n in DETECTION_FIELDS])
        title = "Instance segmentation" if masks else "Detection"
        results.update(self._write(parameters, context, outputs, metrics, f"{title} accuracy of {pred.sourceName()}",
                                   fields, [[metrics.get(n) for n in DETECTION_FIELDS]]))
        return results

    # -- multi-label patches -----------------------------------------------------------------------------------------

    def _assess_multilabel(self, parameters, context, feedback, outputs):
        """Multi-label patches (a polygon layer with comma-separated labels) against reference polygons."""
        from ..rs_deep_plugin.engine.evaluation.accuracy import MULTILABEL_FIELDS, assess_multilabel_patches, table_rows
        pred, source, area = self._vector_inputs(
            parameters, context, "Multi-label patches", "the patch layer written by Patch classification with a "
            "multi-label model", "the polygons of the true classes, with their class names in CLASS_FIELD")
        ref_field = self.parameterAsString(parameters, CLASS_FIELD, context)
        if not ref_field:
            raise QgsProcessingException("Multi-label patches: give CLASS_FIELD, the field of REFERENCE holding each "
                                         "polygon's class name")
        labels_field = self.parameterAsString(parameters, PREDICTION_CLASS_FIELD, context) or "labels"
        cover = number_or(self, parameters, LABEL_COVER, context, COVER_DEFAULT)
        crs = pred.sourceCrs()
        patches = predicted_patches(pred, labels_field, area, feedback)
        reference = read_labelled_polygons(source, ref_field, crs, context, feedback, "REFERENCE")
        names = None
        if parameters.get(MODEL):
            pkg = load_model_package(self.parameterAsFile(parameters, MODEL, context), None)
            names = [c.name for c in pkg.classes]
            feedback.pushInfo(f"Classes from the model package {pkg.name}: {', '.join(names)}")
        metrics = assess_multilabel_patches(patches, [(g, str(v)) for g, v in reference], names, cover)
        feedback.pushInfo(f"{metrics['patches']} patches against {len(reference)} reference polygons (a class is a "
                          f"true label where it covers at least {cover:g} of a patch): micro F1 "
                          f"{_f(metrics['micro_f1'])}, macro F1 {_f(metrics['macro_f1'])}, exact match "
                          f"{_f(metrics['exact_match'])}")
        for n in metrics["class_names"]:
            c = metrics["classes"][n]
            feedback.pushInfo(f"  {n}: precision {_f(c['precision'])}, recall {_f(c['recall'])}, F1 {_f(c['f1'])}, "
                              f"{c['support']} reference patches, {c['predicted']} predicted")
        results = dict(PRECISION=metrics["micro_precision"], RECALL=metrics["micro_recall"], F1=metrics["micro_f1"],
                       MICRO_F1=metrics["micro_f1"], MACRO_F1=metrics["macro_f1"])
        fields = make_fields(*[(n, "string" if n == "class_name" else "double" if n in ("precision", "recall", "f1")
                                else "int") for n in MULTILABEL_FIELDS])
        rows = [[r[k] for k in MULTILABEL_FIELDS] for r in table_rows(metrics)]
        results.update(self._write(parameters, context, outputs, metrics, f"Multi-label accuracy of "
                                   f"{pred.sourceName()}", fields, rows))
        return results

    def _vector_inputs(self, parameters, context, what, prediction, reference):
        """(PREDICTION_BOXES, REFERENCE, EXTENT as a QgsRectangle in the prediction's CRS or None): both sources are
        required, their refusals start with ``what`` and say what to give (``prediction``, ``reference``)."""
        pred = self.parameterAsSource(parameters, PREDICTION_BOXES, context)
        if pred is None:
            raise QgsProcessingException(f"{what}: give PREDICTION_BOXES, {prediction}")
        source = self.parameterAsSource(parameters, REFERENCE, context)
        if source is None:
            raise QgsProcessingException(f"{what}: give REFERENCE, {reference}")
        extent = self.parameterAsExtent(parameters, EXTENT, context, pred.sourceCrs())
        area = None if extent is None or extent.isNull() or extent.isEmpty() else QgsRectangle(extent)
        return pred, source, area

    # -- the report and the table ------------------------------------------------------------------------------------

    def _write(self, parameters, context, outputs, metrics, title, fields, rows):
        """The HTML report (OUTPUT_HTML) and the table (OUTPUT_TABLE: ``fields``, one feature per row of ``rows``),
        those asked for, into the run's transaction; returns their results."""
        from ..rs_deep_plugin.engine.errors import RSDeepError
        from ..rs_deep_plugin.engine.evaluation.accuracy import write_report
        results = {}
        html_path = self.parameterAsFileOutput(parameters, OUTPUT_HTML, context) \
            if parameters.get(OUTPUT_HTML) not in (None, "") else ""
        if html_path:
            try:
                write_report(metrics, html_path=html_path, title=title, transaction=outputs.transaction)
            except (OSError, RSDeepError) as exc:
                raise QgsProcessingException(f"Cannot write the report {html_path}: {exc}") from exc
            results[OUTPUT_HTML] = html_path
        if parameters.get(OUTPUT_TABLE) not in (None, ""):
            with FeatureSinks(self, parameters, context, outputs.transaction) as sinks:  # committed with the rest
                sink = sinks.create(OUTPUT_TABLE, fields, QgsWkbTypes.NoGeometry, QgsCoordinateReferenceSystem())
                for row in rows:
                    feat = QgsFeature(fields)
                    feat.setAttributes(row)
                    sink.addFeature(feat, QgsFeatureSink.FastInsert)
            results.update(sinks.results)
        return results


def _f(v):
    return "n/a" if v is None else f"{v:.4f}"
