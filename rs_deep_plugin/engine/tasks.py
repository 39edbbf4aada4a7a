"""The tasks of RS Deep in one table: how the code, model packages (MLM), users and Processing name each, and
which class names mean "nothing here". Plain data, no import: every layer of the engine, the algorithms and the GUI
may read it."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One task. ``background``: the label values that mark background polygons when labels become classes (the
    first is the name of class 0); ``first_color``: the index of ``DEFAULT_COLORS`` the first class takes by default
    (0: the black background first; 1: no background class, the first class gets the first colour)."""

    name: str  # rs_deep:task in model.json, TASK=... of the algorithms
    mlm: str  # the MLM task name (mlm:tasks)
    label: str  # shown to users
    algorithm: str  # the Processing algorithm that applies a model of this task
    background: tuple = ()
    first_color: int = 0

    @property
    def short(self):
        """The label in a sentence: "segmentation", "object detection" ..."""
        return self.label.lower().replace("semantic segmentation", "segmentation")

    @property
    def algorithm_name(self):
        """The algorithm's name within the provider ("segment" of "rs_deep:segment")."""
        return self.algorithm.partition(":")[2]


SEGMENTATION = Task("segmentation", "semantic-segmentation", "Semantic segmentation", "rs_deep:segment",
                    ("background",))
DETECTION = Task("detection", "object-detection", "Object detection", "rs_deep:detect", first_color=1)
#: one polygon per object (its mask), with its class and score: Mask R-CNN (:mod:`.models.arch_torchvision`)
INSTANCE_SEGMENTATION = Task("instance_segmentation", "instance-segmentation", "Instance segmentation",
                             "rs_deep:segment_instances", first_color=1)
PATCH_CLASSIFICATION = Task("patch_classification", "scene-classification", "Patch classification",
                            "rs_deep:classify_patches", first_color=1)
CHANGE = Task("change", "segmentation", "Change detection", "rs_deep:detect_change",
              ("no change", "no_change", "unchanged", "background"))
#: raster to raster: a value per pixel and output channel (float32), and an image ``scale`` times finer
REGRESSION = Task("regression", "regression", "Regression", "rs_deep:predict_raster", first_color=1)
SUPER_RESOLUTION = Task("super_resolution", "super-resolution", "Super-resolution", "rs_deep:predict_raster",
                        first_color=1)
#: similarity search: an embedding model (one vector per image) compared with a query image, patch by patch (the
#: Deepness "Recognition" model type); ONNX models only: no RS Deep architecture is trained for it
RECOGNITION = Task("recognition", "similarity-search", "Similarity search (recognition)", "rs_deep:find_similar",
                   first_color=1)

#: name -> task, in the order the toolbox lists them
TASKS = {t.name: t for t in (SEGMENTATION, DETECTION, PATCH_CLASSIFICATION, CHANGE, REGRESSION, SUPER_RESOLUTION,
                              INSTANCE_SEGMENTATION, RECOGNITION)}
#: the tasks of models that come only as ONNX files (a model.json package of these tasks is refused)
ONNX_ONLY_TASKS = ("recognition",)
#: the tasks whose models find objects (boxes, or boxes and masks): score, overlap and count thresholds
OBJECT_TASKS = ("detection", "instance_segmentation")
#: the tasks whose models turn a raster into a raster (rs_deep:predict_raster)
RASTER_TASKS = ("regression", "super_resolution")

#: class names of a model that mean "nothing here": not vectorised, not a foreground class when assessing
BACKGROUND_NAMES = ("background", "other", "none", "no change", "no_change", "unchanged")


def wrong_task(found, wanted):
    """The sentence that refuses a model of task ``found`` where a model of ``wanted`` (a task name, or several) is
    needed: "this is a <found> model; this tool needs a <wanted> model (...: run it with <its algorithm>)"."""
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    return f"this is {_a(found)} model; this tool needs {_a(' or '.join(wanted))} model{runs_with(found)}"


def _a(noun):
    """``noun`` with its indefinite article: "an instance_segmentation", "a detection"."""
    return f"{'an' if str(noun)[:1].lower() in 'aeiou' else 'a'} {noun}"


def runs_with(found):
    """" (<task> models run with <algorithm>)" for a model of task ``found`` ("" for an unknown task)."""
    task = TASKS.get(found)
    return f" ({task.short} models run with {task.algorithm})" if task else ""


def is_background(name):
    """Whether a model class of this name is the background (:data:`BACKGROUND_NAMES`, any case)."""
    return str(name).strip().lower() in BACKGROUND_NAMES


__all__ = ["Task", "TASKS", "SEGMENTATION", "DETECTION", "PATCH_CLASSIFICATION", "CHANGE", "REGRESSION",
           "SUPER_RESOLUTION", "INSTANCE_SEGMENTATION", "RECOGNITION", "ONNX_ONLY_TASKS", "RASTER_TASKS",
           "OBJECT_TASKS", "BACKGROUND_NAMES", "is_background", "wrong_task", "runs_with"]
