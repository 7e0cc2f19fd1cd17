"""The adapter layers end to end on the Triton kernels (interpreter on CPU, compiled on CUDA),
and torch.compile of a BOFT layer without graph breaks."""

import copy

import pytest
import torch

from boft_triton import BOFTConfig, BOFTModel, adapt
from tiny_models import build, call, rel_err

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _train(model, inputs, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = call(model, inputs).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("n_factors", [1, 2])
def test_tiny_llama_trains_the_same_on_kernels_and_torch_path(monkeypatch, n_factors):
    base, inputs = build("Llama")
    config = BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8, boft_n_butterfly_factor=n_factors,
                        init_weights=False)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    models, losses = {}, {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BOFT_TRITON_BACKEND", backend)
        torch.manual_seed(0)
        models[backend] = adapt(copy.deepcopy(base), config).to(DEVICE)
        losses[backend] = _train(models[backend], inputs)
    assert losses["torch"][-1] != losses["torch"][0], "the adapter must train"
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)
    theirs = dict(models["torch"].named_parameters())
    for name, p in models["triton"].named_parameters():
        if p.requires_grad:
            assert rel_err(p, theirs[name]) < 1e-5, name


def test_merge_on_kernels_matches_torch_path(monkeypatch):
    base, inputs = build("MLP2")
    config = BOFTConfig(target_modules=["lin0"], boft_block_size=4, boft_n_butterfly_factor=3, init_weights=False)
    merged = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BOFT_TRITON_BACKEND", backend)
        torch.manual_seed(0)
        merged[backend] = adapt(copy.deepcopy(base).to(DEVICE), config).merge_and_unload().lin0.weight
    assert rel_err(merged["triton"], merged["torch"]) < 1e-5


def _dropout_config(targets, **kwargs):
    return BOFTConfig(target_modules=targets, boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5,
                      init_weights=False, **kwargs)


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_name,targets", [("MLP2", ["lin0"]), ("Conv2d2", ["conv2d"])])
def test_compile_fullgraph_one_frame(model_name, targets):
    """In train mode with dropout, forward and backward of an adapted model compile with the default
    backend (inductor) as one frame, and the compiled step draws the same blocks as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    base, inputs = build(model_name)
    model = adapt(base, _dropout_config(targets)).to(DEVICE)
    model.train()
    inputs = tuple(t.to(DEVICE) for t in inputs)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = compiled(*inputs)
        out.sum().backward()
        grads = _trainable_grads(model)
        model.zero_grad()
        torch.manual_seed(seed)
        expected = model(*inputs)
        expected.sum().backward()
        assert rel_err(out, expected) < 1e-5
        for name, grad in _trainable_grads(model).items():
            assert rel_err(grads[name], grad) < 1e-5, name
        model.zero_grad()
        outputs.append(out.detach())
    assert counter.frame_count == 1
    assert rel_err(outputs[0], outputs[1]) > 1e-4, "the two seeds must drop different blocks"


def test_compiled_dropout_draws_match_peft(tmp_path, peft_with_butterfly):
    """Two adapters, two layers: the inductor-compiled model drops PEFT's blocks under PEFT's seed
    (same random calls, same order)."""
    from peft import BOFTConfig as PeftBOFTConfig
    from peft import get_peft_model

    torch._dynamo.reset()
    base, inputs = build("MLP2")
    kwargs = {"target_modules": ["lin0", "lin1"], "boft_block_size": 2, "boft_n_butterfly_factor": 2,
              "boft_dropout": 0.5, "init_weights": False}
    theirs = get_peft_model(copy.deepcopy(base), PeftBOFTConfig(**kwargs))
    theirs.add_adapter("other", PeftBOFTConfig(**kwargs))
    theirs.base_model.set_adapter(["default", "other"])
    theirs.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.load_adapter(tmp_path / "other", "other", is_trainable=True)
    ours.set_adapter(["default", "other"])
    theirs.train(), ours.train()
    compiled = torch.compile(ours, fullgraph=True)
    for seed in range(2):
        torch.manual_seed(seed)
        expected = theirs(*inputs)
        torch.manual_seed(seed)
        assert rel_err(compiled(*inputs), expected) < 1e-5


PEFT_KERNEL_CASES = ["MLP-b10-N2", "MLP2-b2-N3", "Conv2d-b45", "Llama"]


@pytest.mark.parametrize("case", PEFT_KERNEL_CASES)
def test_peft_parity_through_the_kernels(monkeypatch, tmp_path, peft_with_butterfly, case):
    """PEFT's BOFT and ours on the Triton kernels (cayley, coarse blocks, tl.dot apply and its
    backward): same outputs and the same gradients of every adapter parameter, fp32."""
    from tiny_models import CONFIG_MATRIX

    _, model_name, kwargs = next(c for c in CONFIG_MATRIX if c[0] == case)
    base, inputs = build(model_name)
    _check_peft_parity(monkeypatch, tmp_path, base, inputs, {"init_weights": False, **kwargs})


def _check_peft_parity(monkeypatch, tmp_path, base, inputs, kwargs):
    """PEFT's BOFT (its dense path) and ours on the kernels, from PEFT's saved adapter: outputs
    within 1e-5, gradients of every adapter parameter within 1e-4 (fp32)."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kwargs)).eval()
    theirs.save_pretrained(tmp_path)
    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).to(DEVICE).eval()
    ours_inputs = ({k: v.to(DEVICE) for k, v in inputs.items()} if isinstance(inputs, dict)
                   else tuple(t.to(DEVICE) for t in inputs))
    out_theirs, out_ours = call(theirs, inputs), call(ours, ours_inputs)
    assert rel_err(out_ours.cpu(), out_theirs) < 1e-5
    out_theirs.pow(2).sum().backward()
    out_ours.pow(2).sum().backward()
    their_grads = {n.removeprefix("base_model.").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if "boft_" in n}
    our_grads = {n.removeprefix("base_model.").replace(".default", ""): p.grad
                 for n, p in ours.named_parameters() if "boft_" in n}
    assert their_grads.keys() == our_grads.keys() and their_grads
    for key in their_grads:
        assert rel_err(our_grads[key].cpu(), their_grads[key]) < 1e-4, key


@pytest.mark.parametrize("block_num,n_factors", [(4, 3), (2, 2)], ids=["D4-N3", "D2-N2"])
def test_peft_parity_on_wide_blocks(monkeypatch, tmp_path, peft_with_butterfly, block_num, n_factors):
    """PEFT's examples set boft_block_num, so blocks grow with the layer: on a 160-wide Linear,
    block_num=4, N=3 (b=40: three one-level groups, one pass each way) and block_num=2, N=2 (b=80:
    the one-pass forward, plan()'s backward). PEFT's BOFT and ours on the kernels: same outputs,
    same gradients of every adapter parameter, fp32."""
    from boft_triton.kernels import butterfly as kb

    assert kb.fused_groups(160, 160 // block_num, n_factors) is not None
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(160, 24)).eval()
    kwargs = {"target_modules": ["0"], "boft_block_size": 0, "boft_block_num": block_num,
              "boft_n_butterfly_factor": n_factors, "init_weights": False}
    _check_peft_parity(monkeypatch, tmp_path, base, (torch.randn(2, 9, 160),), kwargs)


def test_peft_parity_where_a_one_pass_prefix_splits_the_butterfly(monkeypatch, tmp_path, peft_with_butterfly):
    """PEFT's multi-concept block_num=8, N=3 on a 640-wide layer (b = 80, L = 320: three 128-wide
    groups that do not fit on chip together): the top level a pass, the two lower ones the
    one-pass prefix (an 80x2 butterfly on Q's first two levels). PEFT's BOFT and ours on the
    kernels: same outputs, same gradients of every adapter parameter, fp32."""
    from boft_triton.kernels import butterfly as kb

    assert kb.fused_groups(640, 80, 3) is None and kb.split_prefix(640, 80, 3) == 2
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(640, 24)).eval()
    kwargs = {"target_modules": ["0"], "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3,
              "init_weights": False}
    _check_peft_parity(monkeypatch, tmp_path, base, (torch.randn(2, 9, 640),), kwargs)


# Gradients through a bf16 layer carry several roundings to bf16 (the rotated rows h, y, g, and on
# the coarse route dMc and Delta_c): 0.6-1.0e-2 measured at 300 rows against PEFT's fp32 path
# (the per-group route, with fp32 block operands in the interpreter: 0.65e-2).
BF16_END_TO_END = 2e-2


def _check_bf16_against_peft(monkeypatch, tmp_path, width, out, rows, block_num, n_factors):
    """A ``width -> out`` linear layer under BOFT (``block_num``, ``n_factors``), bf16 activations
    on ``rows`` rows: ours against PEFT's fp32 dense path on the same (bf16-rounded) inputs and base
    weights; outputs within one op's bf16 tolerance, dx and the adapter gradients within
    BF16_END_TO_END."""
    import warnings

    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(width, out)).eval()
    with torch.no_grad():  # the same base weights on both sides: bf16's values
        for p in base.parameters():
            p.copy_(p.bfloat16().float())
    kwargs = {"target_modules": ["0"], "boft_block_size": 0, "boft_block_num": block_num,
              "boft_n_butterfly_factor": n_factors, "init_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**kwargs)).eval()
    theirs.save_pretrained(tmp_path)
    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    ours = BOFTModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path, is_trainable=True)
    ours = ours.to(DEVICE).eval()
    x = torch.randn(2, rows // 2, width, dtype=torch.bfloat16)
    x_theirs, x_ours = x.float().requires_grad_(), x.to(DEVICE).requires_grad_()
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    assert y_ours.dtype == torch.bfloat16 and rel_err(y_ours.float().cpu(), y_theirs) < 1e-2
    y_theirs.pow(2).sum().backward()
    y_ours.float().pow(2).sum().backward()
    assert rel_err(x_ours.grad.float().cpu(), x_theirs.grad) < BF16_END_TO_END
    grads = [{n.removeprefix("base_model.").replace(".default", ""): p.grad for n, p in model.named_parameters()
              if "boft_" in n} for model in (theirs, ours)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        assert rel_err(grads[1][key].float().cpu(), grads[0][key]) < BF16_END_TO_END, key


@pytest.mark.parametrize("block_num,n_factors,route", [(8, 3, "coarse"), (4, 2, "coarse"), (2, 1, "wide"),
                                                        (4, 3, "coarse")],
                         ids=["D8-N3", "D4-N2", "D2-N1", "D4-N3"])
def test_peft_parity_in_bf16_where_dx_comes_from_the_dmc_pass(monkeypatch, tmp_path, peft_with_butterfly, block_num,
                                                              n_factors, route):
    """bf16 activations on a 320-wide layer, 300 rows: DreamBooth's block_num=8, N=3 (40x3) and
    block_num=4, N=2 (80x2) run their backward through the dense coarse blocks, block_num=2, N=1
    (one 160-wide level) through ``wide_grads``; in each, dx comes out of the dMc pass. block_num=4,
    N=3 (80x3) runs its top level as a pass of its own and its two lower levels as the one-pass
    prefix (``split_prefix``), whose backward takes the dense coarse blocks. Against
    PEFT's fp32 dense path on the same (bf16-rounded) inputs and base weights: outputs within one
    op's bf16 tolerance, dx and the adapter gradients within BF16_END_TO_END."""
    from boft_triton.kernels import coarse, wide

    passes = []  # the backward's one-pass kernels, by route
    for module, name in ((coarse, "grad"), (wide, "wide_grads")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _m=module: passes.append(_m) or _o(*a))
    # wider out than in: x is rotated, not W
    _check_bf16_against_peft(monkeypatch, tmp_path, 320, 1024, 300, block_num, n_factors)
    assert passes == [coarse if route == "coarse" else wide]


@pytest.mark.parametrize("width,block_num,n_factors", [(640, 2, 1), (1280, 4, 2)], ids=["b320-N1", "b320-N2"])
def test_peft_parity_in_bf16_on_levels_past_256(monkeypatch, tmp_path, peft_with_butterfly, width, block_num,
                                                n_factors):
    """Levels of 257-384 columns (Stable Diffusion's block_num=4 on 1280-wide layers: b = 320) hold
    their forward's Delta slab as two tiles (``wide.held_tail``: 256 + 64 rows, 128-column
    slabs), in the forward and in dx (the forward on g, transpose flipped). bf16 against PEFT's
    fp32 dense path on the same bf16-rounded inputs and base weights: outputs within one op's bf16
    tolerance, dx and the adapter gradients within BF16_END_TO_END."""
    from boft_triton.kernels import wide

    tails = []  # each forward launch's tail tile (dx: the forward, transpose flipped)
    apply = wide.apply_into
    monkeypatch.setattr(wide, "apply_into", lambda *a: tails.append(wide.held_tail(a[4][1], a[0].dtype)) or apply(*a))
    _check_bf16_against_peft(monkeypatch, tmp_path, width, 64, 40, block_num, n_factors)
    assert tails == [64] * 2 * n_factors  # every level's forward, then its dx


@pytest.mark.parametrize("width,block_num,n_factors", [(320, 2, 1), (512, 2, 2)], ids=["b160-N1", "b256-N2"])
def test_peft_parity_on_levels_wider_than_128(monkeypatch, tmp_path, peft_with_butterfly, width, block_num, n_factors):
    """Single levels wider than a program holds (b = 160, DreamBooth's block_num=8 on 1280-wide
    layers; b = 256 with two interleaved levels) run the slab kernels (kernels/wide.py): PEFT's
    BOFT and ours, same outputs and adapter gradients, fp32."""
    from boft_triton.kernels import butterfly as kb
    from boft_triton.kernels import wide

    assert all(wide.is_wide(g) for g in kb.plan(width, width // block_num, n_factors))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(width, 24)).eval()
    kwargs = {"target_modules": ["0"], "boft_block_size": 0, "boft_block_num": block_num,
              "boft_n_butterfly_factor": n_factors, "init_weights": False}
    _check_peft_parity(monkeypatch, tmp_path, base, (torch.randn(2, 9, width),), kwargs)
