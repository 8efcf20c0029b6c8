"""The examples in docstrings run and print what they say (written as transformers writes them: `>>>` inside
markdown fences, which are dropped before running)."""

import doctest
import importlib
import re

import pytest

MODULES = [
    "convnextv2_hf.configuration_convnextv2",
    "convnextv2_hf.modeling_convnextv2",
    "convnextv2_hf.image_processing_convnextv2",
    "convnextv2_hf.inference",
    "convnextv2_hf.analysis",
    "convnextv2_hf.training.loops.optim",
]


class FencedDocTestParser(doctest.DocTestParser):
    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^\s*```(python)?\s*$", "", string, flags=re.M), name)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{module_name} has no docstring example"
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
