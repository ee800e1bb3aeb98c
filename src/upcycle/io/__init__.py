"""Reading and writing models: checkpoints and LoRA ingredients as tensor sources
(:mod:`.checkpoints`, :mod:`.lora`, opened and checked by :mod:`.ingredients`), and atomic
outputs (:mod:`.writing`)."""

from .checkpoints import Ingredient
from .ingredients import expand_ingredient_paths, open_ingredients, validate_ingredients
from .lora import LoraIngredient
from .source import TensorSource
from .writing import atomic_dir, atomic_file, save_model, write_json

__all__ = ["Ingredient", "LoraIngredient", "TensorSource", "atomic_dir", "atomic_file", "expand_ingredient_paths",
           "open_ingredients", "save_model", "validate_ingredients", "write_json"]
