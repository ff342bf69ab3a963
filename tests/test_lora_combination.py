"""LoRA combinations against peft's add_weighted_adapter: the combined delta of every module,
DARE's statistics, the combined adapter exported to peft, and bad input."""

from __future__ import annotations

import dataclasses
import itertools

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jpeft
from jpeft import lora, lora_combination
from jpeft import targets as targeting

# float32 both sides, the same arithmetic in another order.
EXACT_TOLERANCE = 1e-5
# A truncated SVD is unique up to the signs and rotations of its factors, not of its
# product: compared on the delta, float32 SVDs of 32x48 matrices agree to ~1e-6.
SVD_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-4

# Four peft adapters over one tiny Llama (2 layers; q/o [32, 32], k/v [32, 16], down
# [48, 32]): different targets, ranks, alphas, rsLoRA, a rank_pattern, and adapters of
# layer 1 only (their layer-0 factors, imported into jpeft's stacked arrays, are filler that
# must take no part). "e" comes first in every combination: peft takes the first adapter's
# layers_to_transform for the new one. (No name is a letter of "lora_": peft warns of those.)
ADAPTERS = {
    "e": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "f": dict(
        r=4,
        lora_alpha=4,
        use_rslora=True,
        alpha_pattern={"k_proj": 6},
        target_modules=["q_proj", "k_proj"],
    ),
    "g": dict(
        r=8,
        lora_alpha=16,
        rank_pattern={"down_proj": 6},
        target_modules=["v_proj", "down_proj"],
        layers_to_transform=[1],
    ),
    "h": dict(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("combination")
    hf = hf_models.make("llama", folder / "base")
    torch.manual_seed(1)
    first, *rest = ADAPTERS
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[first]), adapter_name=first
    )
    for name in rest:
        peft_model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    with torch.no_grad():  # B ~ U(±1/√r) and A ~ kaiming: both non-zero, of similar sizes
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5).add_(0.05 * torch.randn_like(p))
    peft_model.eval()
    peft_model.save_pretrained(folder / "peft")
    model, params = jpeft.models.from_pretrained(folder / "base")
    ours = {n: jpeft.hf.import_peft(params, folder / "peft" / n) for n in ADAPTERS}
    return dict(folder=folder, peft=peft_model, model=model, params=params, ours=ours)


_names = (f"combined{i}" for i in itertools.count())


def _peft_combine(setup, names, weights, **options) -> str:
    new = next(_names)
    setup["peft"].add_weighted_adapter(list(names), list(weights), new, **options)
    return new


def _peft_deltas(peft_model, adapter: str) -> dict[str, np.ndarray]:
    """``{HF module name: ΔW [out, in]}`` of one adapter of a peft model."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and adapter in module.lora_A:
            with torch.no_grad():
                out[name] = module.get_delta_weight(adapter).numpy()
    return out


def _jpeft_deltas(params) -> dict[str, np.ndarray]:
    """``{HF module name: ΔW [out, in]}`` of the LoRA nodes of a jpeft tree."""
    out = {}
    for module in targeting.modules(params):
        node = module.weight
        if isinstance(node, lora.LoraWeight):
            delta = np.asarray(lora.delta_weight(node))
            layers = node.layers if node.layers is not None else range(len(module.names))
            for i in layers:
                out[module.names[i]] = (delta[i] if module.stacked else delta).T
    return out


def _max_difference(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)  # the same modules and layers adapted
    for name, delta in theirs.items():
        assert np.abs(delta).max() > 1e-3, name  # nothing compared is trivially zero
    return max(float(np.abs(ours[n] - theirs[n]).max()) for n in theirs)


def _combine_both(setup, names, weights, kind, **options):
    theirs = _peft_deltas(
        setup["peft"], _peft_combine(setup, names, weights, combination_type=kind, **options)
    )
    key = jax.random.key(0) if kind.startswith("dare") else None
    combined = lora_combination.combine(
        [setup["ours"][n] for n in names], weights, combination_type=kind, key=key, **options
    )
    return combined, _jpeft_deltas(combined), theirs


EXACT_CASES = [
    ("linear", "efh", [0.7, -0.4, 1.3], {}),
    ("linear", "g", [0.6], {}),  # one adapter: linear whatever the type
    ("cat", "efgh", [0.7, -0.4, 0.5, 1.1], {}),
    ("ties", "efh", [0.7, 0.4, -0.8], dict(density=0.5)),
    ("ties", "efh", [0.7, -0.4, 0.9], dict(density=0.6, majority_sign_method="frequency")),
    ("magnitude_prune", "efh", [0.7, -0.4, 0.5], dict(density=0.3)),
    ("dare_linear", "efh", [0.7, -0.4, 0.5], dict(density=1.0)),
    ("dare_ties", "efh", [0.7, 0.4, -0.5], dict(density=1.0)),
    ("dare_ties", "ef", [0.7, -0.4], dict(density=1.0, majority_sign_method="frequency")),
]


@pytest.mark.parametrize(
    "kind,names,weights,options",
    EXACT_CASES,
    ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(EXACT_CASES)],
)
def test_exact_types_match_peft_deltas(setup, kind, names, weights, options):
    _, ours, theirs = _combine_both(setup, names, weights, kind, **options)
    assert _max_difference(ours, theirs) < EXACT_TOLERANCE


SVD_CASES = [
    ("svd", {}),  # rank 8: q_proj's delta (ranks 4 + 4) exact, v and down truncated
    ("svd", dict(svd_rank=16)),  # at least each delta's rank: exact everywhere
    ("svd", dict(svd_rank=3, svd_full_matrices=False)),
    ("svd", dict(svd_rank=20, svd_full_matrices=False)),  # past k_proj's min(in, out) = 16
    ("ties_svd", dict(density=0.5, svd_rank=5)),
    ("ties_svd", dict(density=0.7, majority_sign_method="frequency")),
    ("dare_linear_svd", dict(density=1.0, svd_rank=6)),
    ("dare_ties_svd", dict(density=1.0)),
    ("magnitude_prune_svd", dict(density=0.4, svd_rank=16)),
]


@pytest.mark.parametrize(
    "kind,options", SVD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SVD_CASES)]
)
def test_svd_types_match_peft_reconstructed_deltas(setup, kind, options):
    _, ours, theirs = _combine_both(setup, "efgh", [0.7, -0.4, 0.5, 1.1], kind, **options)
    assert _max_difference(ours, theirs) < SVD_TOLERANCE


def test_cat_is_the_weighted_sum_of_the_deltas_even_after_an_rslora_adapter(setup):
    # peft copies the first adapter's use_rslora into the new adapter's config with
    # lora_alpha = r, so its "f" first result is √r times this sum (measured: 2.8284 at
    # r = 8); jpeft's new adapter has scale 1 whatever the inputs.
    f, e = setup["ours"]["f"], setup["ours"]["e"]
    combined = lora_combination.combine([f, e], [0.7, 0.4], combination_type="cat")
    ours, deltas = _jpeft_deltas(combined), [_jpeft_deltas(f), _jpeft_deltas(e)]
    assert set(ours) == set(deltas[0]) | set(deltas[1])
    for name, delta in ours.items():
        expected = 0.7 * deltas[0].get(name, 0.0) + 0.4 * deltas[1].get(name, 0.0)
        np.testing.assert_allclose(delta, expected, atol=EXACT_TOLERANCE, err_msg=name)


def test_qlora_adapters_combine_over_their_nf4_base(setup):
    from jpeft import qlora
    from jpeft.quant import nf4

    quantized = qlora.quantize(setup["params"], block_size=32)
    x, y = (
        lora.apply(quantized, rank=4, targets=t, init_lora_weights=False, key=jax.random.key(i))
        for i, t in enumerate((["q_proj", "v_proj"], ["q_proj", "k_proj"]))
    )
    combined = lora_combination.combine([x, y], [0.5, -1.0], combination_type="svd")
    keys = ("model", "layers", "self_attn", "q_proj", "weight")
    node = jpeft.tree.get_path(combined, keys)
    assert isinstance(node.w, nf4.NF4Weight) and node.w is jpeft.tree.get_path(x, keys).w
    ours, dx, dy = _jpeft_deltas(combined), _jpeft_deltas(x), _jpeft_deltas(y)
    for name, delta in ours.items():
        if name.endswith("q_proj"):  # rank 4 + 4, truncated to 4; k and v: one adapter, exact
            continue
        expected = 0.5 * dx.get(name, 0.0) - dy.get(name, 0.0)
        np.testing.assert_allclose(delta, expected, atol=SVD_TOLERANCE, err_msg=name)


def test_svd_rank_is_the_rank_of_the_result(setup):
    combined = lora_combination.combine(
        [setup["ours"][n] for n in "efg"], [1.0, 1.0, 1.0], combination_type="svd", svd_rank=3
    )
    for module in targeting.modules(combined):
        if isinstance(module.weight, lora.LoraWeight):
            assert module.weight.rank == 3
            delta = np.asarray(lora.delta_weight(module.weight))
            assert np.linalg.matrix_rank(delta[-1], tol=1e-5) == 3


def test_svd_clamp_is_peft_clamp_of_the_factors(setup):
    # Not compared with peft's result: its factors are unique only up to the sign of each
    # singular pair, which LAPACK builds choose differently, and the clamp's quantile is
    # over the signed entries (measured: equal where torch and XLA pick the same signs,
    # ~1e-2 apart where not). So: peft's clamp code, run on jpeft's unclamped factors.
    options = dict(combination_type="svd", svd_rank=4)
    inputs = [setup["ours"][n] for n in "efg"]
    plain = lora_combination.combine(inputs, [0.7, -0.4, 0.5], **options)
    clamped = lora_combination.combine(inputs, [0.7, -0.4, 0.5], svd_clamp=0.8, **options)
    for keys in [("model", "layers", "self_attn", n, "weight") for n in ("q_proj", "k_proj")]:
        node, unclamped = jpeft.tree.get_path(clamped, keys), jpeft.tree.get_path(plain, keys)
        for layer in range(2):
            lora_b = torch.tensor(np.asarray(unclamped.b[layer]).T)  # U·S [out, k]
            lora_a = torch.tensor(np.asarray(unclamped.a[layer]).T)  # Vh [k, in]
            high = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), 0.8)
            assert (lora_a.abs() > high).any()  # the clamp changes something
            np.testing.assert_allclose(
                np.asarray(node.a[layer]).T, lora_a.clamp(-high, high).numpy(), atol=1e-7
            )
            np.testing.assert_allclose(
                np.asarray(node.b[layer]).T, lora_b.clamp(-high, high).numpy(), atol=1e-7
            )


@pytest.mark.parametrize(
    "kind,names,options",
    [
        ("cat", "efgh", {}),
        ("ties", "efh", dict(density=0.5)),
        ("svd", "efgh", dict(svd_rank=16)),
    ],
)
def test_combined_adapter_exports_and_peft_runs_it_with_equal_logits(
    setup, kind, names, options, tmp_path
):
    weights = [0.7, -0.4, 0.5, 1.1][: len(names)]
    combined = lora_combination.combine(
        [setup["ours"][n] for n in names], weights, combination_type=kind, **options
    )
    out = jpeft.hf.export_peft(combined, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(setup["folder"] / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    ours = np.asarray(
        setup["model"](combined, data["input_ids"], attention_mask=data["attention_mask"])
    )
    theirs = hf_models.hf_logits(loaded, data["input_ids"], data["attention_mask"])
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=LOGITS_TOLERANCE)
    # ... and those are the logits of peft's own combination.
    reference = setup["peft"]
    new = _peft_combine(setup, names, weights, combination_type=kind, **options)
    reference.set_adapter(new)
    try:
        expected = hf_models.hf_logits(reference, data["input_ids"], data["attention_mask"])
    finally:
        reference.set_adapter("e")
    np.testing.assert_allclose(ours[valid], expected[valid], atol=LOGITS_TOLERANCE)


def test_combined_adapter_merges_saves_and_keeps_the_base(setup, tmp_path):
    inputs = [setup["ours"][n] for n in "efg"]
    combined = lora_combination.combine(inputs, [0.5, 0.5, 1.0], combination_type="cat")
    node = combined["model"]["layers"]["mlp"]["down_proj"]["weight"]
    assert node.rank == 4 + 4 + 8  # peft's: the sum of the adapters' ranks
    np.testing.assert_array_equal(node.scale, [1.0, 1.0])
    assert node.layers is None and not node.rslora
    base = setup["params"]["model"]["layers"]["mlp"]["down_proj"]["weight"]
    assert node.w is base  # the base is shared, not copied
    untouched = ("model", "layers", "mlp", "up_proj", "weight")  # no adapter adapts it
    assert jpeft.tree.get_path(combined, untouched) is jpeft.tree.get_path(inputs[0], untouched)
    ids = contract.batch(97)["input_ids"]
    model = setup["model"]
    logits = np.asarray(model(combined, ids))
    np.testing.assert_allclose(np.asarray(model(lora.merge(combined), ids)), logits, atol=1e-5)
    jpeft.save_adapter(combined, tmp_path / "saved")
    back = jpeft.load_adapter(setup["params"], tmp_path / "saved")
    np.testing.assert_array_equal(np.asarray(model(back, ids)), logits)


def test_layers_no_adapter_adapts_stay_unadapted(setup):
    combined = lora_combination.combine(
        [setup["ours"]["g"], setup["ours"]["h"]], [1.0, 1.0], combination_type="svd"
    )
    node = combined["model"]["layers"]["self_attn"]["v_proj"]["weight"]
    assert node.layers == (1,)
    np.testing.assert_array_equal(node.scale, [0.0, 1.0])
    np.testing.assert_array_equal(node.a[0], 0.0)
    np.testing.assert_array_equal(node.b[0], 0.0)


# ----------------------------------------------------------------------------------- DARE


@pytest.fixture(scope="module")
def wide(setup):
    """Two random rank-16 adapters on every linear of the tiny Llama (7680 entries in the A
    factors, as many in the B factors)."""

    def make(seed):
        return lora.apply(
            setup["params"],
            rank=16,
            alpha=32,
            targets="all-linear",
            init_lora_weights=False,
            key=jax.random.key(seed),
        )

    return make(1), make(2)


def _factors(params, field):
    return np.concatenate(
        [
            np.asarray(getattr(m.weight, field)).ravel()
            for m in targeting.modules(params)
            if isinstance(m.weight, lora.LoraWeight)
        ]
    )


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_linear_keeps_a_density_fraction_rescaled_by_its_inverse(wide, density):
    # Weight 0 on the second adapter: the result is the first one's factors, DARE-pruned.
    combined = lora_combination.combine(
        wide, [1.0, 0.0], combination_type="dare_linear", density=density, key=jax.random.key(3)
    )
    root = np.sqrt(2.0)  # √(w · s): s = 32 / 16
    for field, weight in (("a", root), ("b", root)):
        got, original = _factors(combined, field), _factors(wide[0], field)
        kept = got != 0
        # Binomial(n, density) / n over n = 7680 entries: 0.03 is over 5 standard deviations.
        assert abs(kept.mean() - density) < 0.03, (field, kept.mean())
        np.testing.assert_allclose(got[kept], weight * original[kept] / density, rtol=1e-6)


def test_dare_svd_prunes_the_deltas_at_density(wide):
    combined = lora_combination.combine(
        wide,
        [1.0, 0.0],
        combination_type="dare_linear_svd",
        density=0.5,
        svd_rank=48,
        key=jax.random.key(4),
    )
    ours, original = _jpeft_deltas(combined), _jpeft_deltas(wide[0])
    got = np.concatenate([ours[n].ravel() for n in original])
    full = np.concatenate([original[n].ravel() for n in original]) / 0.5
    # Full rank: the SVD rebuilds the pruned delta, each entry 0 or delta / density.
    error = np.minimum(np.abs(got), np.abs(got - full))
    assert error.max() < 1e-5
    clear = np.abs(full) > 1e-3
    kept = np.abs(got - full) < np.abs(got)
    assert abs(kept[clear].mean() - 0.5) < 0.02


def test_magnitude_pruning_keeps_exactly_its_count_among_equal_magnitudes(wide):
    # Factors of ±1 only: every entry ties with every other, and peft's topk still keeps
    # exactly ⌊density · size⌋ of each layer's entries.
    signs = jax.tree.map(
        lambda x: dataclasses.replace(x, a=jnp.sign(x.a), b=jnp.sign(x.b))
        if isinstance(x, lora.LoraWeight) else x,
        wide[0], is_leaf=lambda x: isinstance(x, lora.LoraWeight),
    )  # fmt: skip
    combined = lora_combination.combine(
        [signs, wide[1]], [1.0, 0.0], combination_type="magnitude_prune", density=0.3
    )
    for module in targeting.modules(combined):
        if isinstance(module.weight, lora.LoraWeight):
            a = np.asarray(module.weight.a)  # [layers, in, r]
            kept = (a != 0).reshape(a.shape[0], -1).sum(axis=1)
            np.testing.assert_array_equal(kept, int(0.3 * a[0].size), err_msg=module.names[0])


def test_dare_is_random_by_key_and_repeatable(wide):
    def run(seed):
        out = lora_combination.combine(
            wide, [0.6, 0.4], combination_type="dare_ties", density=0.5, key=jax.random.key(seed)
        )
        return _factors(out, "a")

    first = run(0)
    np.testing.assert_array_equal(run(0), first)
    assert np.mean(run(1) != first) > 0.3
    assert np.isfinite(first).all()


# ------------------------------------------------------------------------------ bad input


def _modified(params, path, value):
    params = jpeft.tree.copy_dicts(params)
    jpeft.tree.set_path(params, path, value)
    return params


def test_bad_options_fail_naming_what_was_expected(setup):
    a, b = setup["ours"]["e"], setup["ours"]["f"]
    cases = [
        (dict(combination_type="average"), "unknown combination_type 'average'"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="ties", density=1.5), r"density must be in \[0, 1\]"),
        (
            dict(combination_type="dare_linear", density=0.0, key=jax.random.key(0)),
            r"density must be in \(0, 1\]",
        ),
        (dict(combination_type="dare_linear", density=0.5), "pass key="),
        (dict(combination_type="linear", density=0.5), "density applies to the pruning types"),
        (
            dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
            "majority_sign_method must be one of",
        ),
        (dict(combination_type="svd", svd_rank=0), "svd_rank must be a positive integer"),
        (dict(combination_type="cat", svd_rank=4), "apply to the SVD types"),
        (dict(combination_type="svd", svd_clamp=1.5), r"svd_clamp is a quantile in \[0, 1\]"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            lora_combination.combine([a, b], [0.5, 0.5], **options)
    with pytest.raises(ValueError, match="2 adapters need 2 weights"):
        lora_combination.combine([a, b], [1.0])
    with pytest.raises(ValueError, match="at least one adapter"):
        lora_combination.combine([], [])


def test_different_ranks_fail_for_the_types_that_merge_factors(setup):
    a, c = setup["ours"]["e"], setup["ours"]["g"]
    for kind in lora_combination.FACTOR_TYPES:
        density = None if kind == "linear" else 1.0
        with pytest.raises(ValueError, match=r"one rank; their ranks are \{0: 4, 1: 8\}"):
            lora_combination.combine(
                [a, c], [0.5, 0.5], combination_type=kind, density=density, key=jax.random.key(0)
            )
    # peft refuses them too
    with pytest.raises(ValueError, match="same r value"):
        _peft_combine(setup, ["e", "g"], [0.5, 0.5], combination_type="linear")
    # A module of another rank (a rank_pattern) in adapters of one rank overall.
    keys = ("model", "layers", "self_attn", "q_proj", "weight")
    node = jpeft.tree.get_path(setup["ours"]["f"], keys)
    narrow = dataclasses.replace(node, a=node.a[..., :2], b=node.b[..., :2, :])
    with pytest.raises(
        ValueError,
        match="model.layers.self_attn.q_proj.weight: .*one rank per "
        "module; adapter 0 has rank 4 there, adapters \\{1: 2\\}",
    ):
        lora_combination.combine(
            [setup["ours"]["e"], _modified(setup["ours"]["f"], keys, narrow)],
            [0.5, 0.5],
            combination_type="linear",
        )


def test_adapters_that_are_not_plain_lora_fail(setup):
    params, a = setup["params"], setup["ours"]["e"]
    key = jax.random.key(0)
    cases = [
        (
            lora.apply(params, rank=4, targets=["q_proj"], use_dora=True, key=key),
            "adapter 1 has a DoRA node at model.layers.self_attn.q_proj.weight",
        ),
        (
            jpeft.ia3.apply(params, model=setup["model"], key=key),
            "adapter 1 has a 'ia3' node at model.layers.",
        ),
        (
            lora.apply(params, rank=4, targets=["q_proj"], modules_to_save=["lm_head"], key=key),
            "adapter 1 trains lm_head.weight in full",
        ),
        (params, "adapter 1 holds no LoRA node"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=message):
            lora_combination.combine([a, other], [0.5, 0.5], combination_type="cat")


def test_adapters_over_another_base_fail(setup):
    a, b = setup["ours"]["e"], setup["ours"]["f"]
    keys = ("model", "layers", "mlp", "up_proj", "weight")
    three_layers = _modified(b, keys, jnp.zeros((3, 32, 48)))
    with pytest.raises(
        ValueError,
        match=r"adapter 1 is not over adapter 0's base: "
        r"model.layers.mlp.up_proj.weight is \[3, 32, 48\], "
        r"expected \[2, 32, 48\]",
    ):
        lora_combination.combine([a, three_layers], [0.5, 0.5], combination_type="cat")
    node = jpeft.tree.get_path(b, ("model", "layers", "self_attn", "k_proj", "weight"))
    wider = _modified(
        b,
        ("model", "layers", "self_attn", "k_proj", "weight"),
        dataclasses.replace(node, w=jnp.zeros((2, 32, 32))),
    )
    with pytest.raises(ValueError, match=r"k_proj.weight is \[2, 32, 32\], expected \[2, 32, 16\]"):
        lora_combination.combine([a, wider], [0.5, 0.5], combination_type="cat")
    missing = jpeft.tree.copy_dicts(b)
    del missing["lm_head"]
    with pytest.raises(ValueError, match="lm_head.weight is in adapter 0 but not in adapter 1"):
        lora_combination.combine([a, missing], [0.5, 0.5], combination_type="cat")
