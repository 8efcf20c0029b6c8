"""Stand-in for transformers' `tests/exporters/test_export.py`, which its sdist does not ship.

The real mixin drives several export back-ends; this one checks what they all start from: `torch.export` of every
model class, with a static and with a dynamic batch size, gives the eager outputs (also at another batch size).
"""

import torch
from torch.utils._pytree import tree_flatten


def tensor_leaves(output):
    leaves, _ = tree_flatten(output.to_tuple() if hasattr(output, "to_tuple") else output)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class ExportTesterMixin:
    test_torch_exportable = True

    def _exportable_cases(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            yield model_class, model, self._prepare_for_class(inputs, model_class)

    def _assert_same_outputs(self, eager, exported, name):
        eager, exported = tensor_leaves(eager), tensor_leaves(exported)
        self.assertEqual(len(eager), len(exported), f"{name}: number of outputs")
        for a, b in zip(eager, exported):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest("test_torch_exportable is False for this model")
        for model_class, model, inputs in self._exportable_cases():
            with torch.no_grad():
                eager = model(**inputs)
                program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                self._assert_same_outputs(eager, program.module()(**inputs), model_class.__name__)

    def test_torch_export_dynamic_batch(self):
        if not self.test_torch_exportable:
            self.skipTest("test_torch_exportable is False for this model")
        batch = torch.export.Dim("batch", min=2, max=1024)
        for model_class, model, inputs in self._exportable_cases():
            shapes = {k: ({0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None) for k, v in inputs.items()}
            smaller = {k: (v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
            with torch.no_grad():
                program = torch.export.export(model, args=(), kwargs=inputs, dynamic_shapes=shapes, strict=False)
                self._assert_same_outputs(model(**smaller), program.module()(**smaller), model_class.__name__)
