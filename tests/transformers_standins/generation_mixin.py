"""Stand-in for transformers' `tests/generation/test_utils.py`, which its sdist does not ship.

`test_modeling_common` only imports `GenerationTesterMixin` to check that generative models inherit it; vision
encoders do not generate, so an empty mixin is the whole contract here.
"""


class GenerationTesterMixin:
    all_generative_model_classes = ()
