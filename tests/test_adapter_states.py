"""Adapter state combinations (merged x disabled x several adapters x delete), run step by step on
boft_triton and on PEFT: after every step both give the same outputs, the same active and merged
adapters, and the same warnings (PEFT unmerges, with a warning, before switching adapters)."""

import copy
import warnings

import pytest
import torch

from boft_triton import BOFTConfig, adapt
from tiny_models import MLP, MLP2

peft = pytest.importorskip("peft")

# (model, input width, config): one butterfly factor, and two (PEFT's N > 1 code, see conftest).
SETUPS = {
    "N1": (MLP, 10, dict(target_modules=["lin0", "lin1"], boft_block_size=2, init_weights=False)),
    "N2": (MLP2, 32, dict(target_modules=["lin0", "lin1"], boft_block_size=4, boft_n_butterfly_factor=2,
                          init_weights=False)),
}

# Each step is (method, args) called on `model.base_model` (PEFT's tuner model; ours is itself),
# except delete_adapter, called on the model (PeftModel must update its own active adapter).
SCENARIOS = {
    "merged-then-switch": [("merge_adapter", ()), ("set_adapter", ("b",))],
    "merged-switch-then-merge_and_unload": [("merge_adapter", ()), ("set_adapter", ("b",)),
                                           ("merge_and_unload", ())],
    "merged-two-then-switch-to-one": [("set_adapter", (["default", "b"],)), ("merge_adapter", ()),
                                      ("set_adapter", ("default",))],
    "merged-then-same-adapter": [("merge_adapter", ()), ("set_adapter", ("default",))],
    "merged-disabled-enabled": [("merge_adapter", ()), ("disable_adapter_layers", ()),
                                ("enable_adapter_layers", ())],
    "merged-disabled-switch-enabled": [("merge_adapter", ()), ("disable_adapter_layers", ()),
                                       ("set_adapter", ("b",)), ("enable_adapter_layers", ())],
    "disabled-switch-enabled": [("disable_adapter_layers", ()), ("set_adapter", ("b",)),
                                ("enable_adapter_layers", ())],
    "merged-delete-refused": [("merge_adapter", ()), ("delete_adapter", ("default",))],
    "merged-switch-delete-old": [("merge_adapter", ()), ("set_adapter", ("b",)), ("delete_adapter", ("default",))],
    "delete-active-falls-back": [("set_adapter", ("b",)), ("delete_adapter", ("b",))],
    "delete-one-of-two-active": [("set_adapter", (["default", "b"],)), ("delete_adapter", ("b",))],
    "merged-two-unmerge-switch": [("set_adapter", (["default", "b"],)), ("merge_adapter", ()),
                                  ("unmerge_adapter", ()), ("set_adapter", ("b",))],
    "disabled-merge-forward-enable": [("disable_adapter_layers", ()), ("merge_adapter", ()),
                                      ("enable_adapter_layers", ())],
}


def _pair(setup="N1"):
    build, width, config = SETUPS[setup]
    torch.manual_seed(0)
    base = build().eval()
    torch.manual_seed(1)
    ours = adapt(copy.deepcopy(base), BOFTConfig(**config))
    ours.add_adapter("b", BOFTConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**config))
        theirs.add_adapter("b", peft.BOFTConfig(**config))
    result = theirs.load_state_dict(_as_peft_state(ours), strict=False)
    assert not result.unexpected_keys  # same tensors, same shapes (N included) on both sides
    return ours.eval(), theirs.eval(), torch.randn(6, width)


def _as_peft_state(ours):
    return {"base_model." + k: v for k, v in ours.state_dict().items() if "boft_" in k}


def _run(model, method, args):
    """Call a step; returns (result, error type or None, the adapter warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            owner = model if method == "delete_adapter" else model.base_model
            result, error = getattr(owner, method)(*args), None
        except ValueError as err:
            result, error = None, type(err)
    said = sorted({str(w.message) for w in caught if "nmerg" in str(w.message) or "deleted" in str(w.message)})
    return result, error, said


def _state(model):
    layers = model.get_layer_status()
    return [(s.name, s.enabled, s.active_adapters, s.merged_adapters, s.requires_grad) for s in layers]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_state_matrix_matches_peft(steps, setup, peft_with_butterfly):
    ours, theirs, x = _pair(setup)
    for method, args in steps:
        our_result, our_error, our_said = _run(ours, method, args)
        their_result, their_error, their_said = _run(theirs, method, args)
        step = f"{method}{args}"
        assert our_error == their_error, step
        assert our_said == their_said, step
        if method == "merge_and_unload":
            torch.testing.assert_close(our_result(x), their_result(x), rtol=1e-5, atol=1e-6, msg=step)
            return
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6, msg=step)
        assert _state(ours) == _state(theirs), step
        assert sorted(ours.peft_config) == sorted(theirs.peft_config), step


def test_switching_a_merged_model_serves_the_new_adapter_only():
    """The reported case: `default` merged, set_adapter("b") must serve b, and merge_and_unload
    must then bake in b alone."""
    ours, _, x = _pair()
    only_b = copy.deepcopy(ours)
    only_b.set_adapter("b")
    with torch.no_grad():
        expected = only_b(x)
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        ours.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-6)
