"""One registry of named model shapes: the planner, the model and the trainer agree on every name."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

from llmbook import model, planning, shapes
from llmbook.shapes import SHAPES, ModelShape, Registry
from llmbook.train_config import TRAIN_PRESETS


def test_module_doctests():
    result = doctest.testmod(shapes)
    assert result.attempted > 0 and result.failed == 0


def test_one_registry_for_planner_and_model():
    assert planning.PRESETS is SHAPES
    assert list(model.PRESETS) == list(SHAPES)
    assert model.PRESETS.aliases == SHAPES.aliases
    for name, shape in SHAPES.items():
        assert shape.name == name
        cfg = model.PRESETS[name]
        assert cfg == model.ModelConfig.from_shape(shape)
        assert cfg.to_shape(name) == shape  # the round trip loses nothing a shape has


@pytest.mark.parametrize(("alias", "name"), SHAPES.aliases.items())
def test_aliases_resolve_but_are_not_listed(alias, name):
    assert SHAPES[alias] is SHAPES[name] and alias in SHAPES and alias not in list(SHAPES)
    assert SHAPES.canonical(alias) == name and SHAPES.canonical(name) == name
    assert model.ModelConfig.preset(alias) == model.ModelConfig.preset(name)


def test_trainer_recipes_name_registered_shapes():
    for recipe in TRAIN_PRESETS.values():
        assert recipe.model in model.PRESETS, recipe.name
    assert SHAPES.canonical(TRAIN_PRESETS["shakespeare"].model) == "laptop-llama"  # the reference model
    assert SHAPES.canonical(TRAIN_PRESETS["shakespeare-nanogpt"].model) == "nanogpt-char-cpu"


def test_nanogpt_character_models():
    """nanoGPT's train.py defaults to bias=False; its get_num_params leaves out the position table."""
    gpu, cpu = SHAPES["nanogpt-char-gpu"], SHAPES["nanogpt-char-cpu"]
    assert (gpu.n_layers, gpu.n_heads, gpu.d_model, gpu.context_length, gpu.vocab_size) == (6, 6, 384, 256, 65)
    assert (cpu.n_layers, cpu.n_heads, cpu.d_model, cpu.context_length, cpu.vocab_size) == (4, 4, 128, 64, 65)
    assert not gpu.bias and not cpu.bias
    n_gpu, n_cpu = planning.count_params(gpu), planning.count_params(cpu)
    assert round((n_gpu.total - n_gpu.positions) / 1e6, 2) == 10.65  # what nanoGPT prints for the GPU model
    assert round(n_gpu.total / 1e6, 1) == 10.7
    assert round((n_cpu.total - n_cpu.positions) / 1e6, 2) == 0.80  # and for the CPU settings


def test_reference_model_and_its_gpt_twin():
    ref, twin = SHAPES["laptop-llama"], SHAPES["laptop-gpt"]
    assert "reference" in ref.note
    same = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads")
    assert [getattr(ref, f) for f in same] == [getattr(twin, f) for f in same]
    assert ref.mlp == "swiglu" and twin.mlp == "gelu"


def test_unknown_name_lists_names_and_aliases():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-5'; choose one of gpt-tiny, .*"
                                         r"shakespeare-char \(= nanogpt-char-cpu\)"):
        model.ModelConfig.preset("gpt-5")
    with pytest.raises(KeyError):
        SHAPES.canonical("gpt-5")


def test_bad_alias_is_refused():
    one = ModelShape("one", 10, 8, 4, 1, 1)
    with pytest.raises(ValueError, match="alias 'x' must name an entry"):
        Registry({"one": one}, aliases={"x": "two"})
    with pytest.raises(ValueError, match="not shadow"):
        Registry({"one": one}, aliases={"one": "one"})


def test_map_keeps_names_and_aliases():
    doubled = SHAPES.map(lambda s: dataclasses.replace(s, n_layers=2 * s.n_layers))
    assert doubled["shakespeare-char"].n_layers == 2 * SHAPES["nanogpt-char-cpu"].n_layers
    assert list(doubled) == list(SHAPES)
