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
