"""The explanation tasks (spec section 2) and modes, shared by the engine and the configuration
(kept free of torch so the configuration loads without it)."""

TASKS = (
    "binary-classification",
    "multiclass-classification",
    "regression",
    "bbox-regression",
    "binary-segmentation",
    "generation",
)
MODES = ("default", "contrastive", "signed")
#: Image tasks the stage explains through a wrapper that the engine seeds with one of ``TASKS``
#: (``governance.stage.output_tasks``): the predicted mask of a segmentation model, the boxes of
#: a box regressor.
IMAGE_OUTPUT_TASKS = ("segmentation", "box-regression")
#: Every task the configuration and the command line accept.
STAGE_TASKS = TASKS + IMAGE_OUTPUT_TASKS
