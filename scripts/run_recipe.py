"""Run a recipe (arms x seeds of training runs) and write its report (probloss/recipe.py).

    python scripts/run_recipe.py recipe=proposal
    python scripts/run_recipe.py recipe=bias_init recipe.seeds=[0] trainer.max_steps=50   # a quick look
"""

from probloss.cli import run_script
from probloss.recipe import run_recipe

if __name__ == "__main__":
    run_script(run_recipe, "recipe", __doc__)
