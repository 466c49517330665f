# Copyright 2026 The BD3-LM HF authors. Licensed under the Apache License, Version 2.0.
"""Stand-in for transformers' `tests/exporters/test_export.py`, which `test_modeling_common.py` imports but the PyPI
sdist does not ship. Written for this project: `ExportTesterMixin.test_torch_export` exports every model class with
`torch.export.export` (static shapes, then a dynamic batch) and compares the exported program with eager."""

from __future__ import annotations

import copy

import torch


class ExportTesterMixin:
    """Mixed into `ModelTesterMixin`; honours its `test_torch_exportable` flag."""

    test_torch_exportable = True

    def _export_inputs(self) -> tuple:
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        tensors = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}
        return config, tensors

    @staticmethod
    def _first_tensor(outputs) -> torch.Tensor:
        if isinstance(outputs, dict):
            outputs = tuple(outputs.values())
        return next(value for value in outputs if isinstance(value, torch.Tensor))

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="the tester sets test_torch_exportable = False")
        config, inputs = self._export_inputs()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config)).eval()
                with torch.no_grad():
                    expected = self._first_tensor(model(**inputs))
                    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                    got = self._first_tensor(program.module()(**inputs))
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def test_torch_export_dynamic_batch(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="the tester sets test_torch_exportable = False")
        config, inputs = self._export_inputs()
        batch = torch.export.Dim("batch", min=1, max=64)
        shapes = {name: {0: batch} for name in inputs}
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config)).eval()
                with torch.no_grad():
                    program = torch.export.export(model, args=(), kwargs=inputs, dynamic_shapes=shapes, strict=False)
                    # a batch size other than the traced one runs through the same program
                    bigger = {name: torch.cat([value, value[:1]]) for name, value in inputs.items()}
                    expected = self._first_tensor(model(**bigger))
                    got = self._first_tensor(program.module()(**bigger))
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
