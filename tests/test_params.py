"""The declared GCFG parameters, settings validation and the infotext round trip (incl. the PNG text)."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from gcfg_core.params import PARAMS, GCFGSettings
from gcfg_core.pngmeta import format_parameters, parse_parameters, quote, read_png_parameters, save_png
from gcfg_core.syntax import TermSyntaxError

TERMS = '# decoupled\n+4 in Van Gogh style, (oil:1.2)\n-2 @prior {0-0.5} "blurry": lowres\n+1.5 @concept'


def test_params_declare_exactly_the_settings_fields():
    assert [p.name for p in PARAMS] == [f.name for f in dataclasses.fields(GCFGSettings)]
    assert [p.default for p in PARAMS] == [getattr(GCFGSettings(), p.name) for p in PARAMS]
    keys = [p.infotext_key for p in PARAMS]
    assert len(set(keys)) == len(keys) and all(k.startswith("GCFG") for k in keys)


@pytest.mark.parametrize("settings", [
    GCFGSettings(enabled=True),
    GCFGSettings(enabled=True, prior="v1-5-pruned-emaonly", concept="faces.safetensors", concept_weight=2.25,
                 negative_scale=-3.5, terms=TERMS),
    GCFGSettings(enabled=True, prior="a, b: c", negative_scale=0.1, concept_weight=-0.3333333333333333),
])
def test_infotext_round_trip_through_png_parameters(settings, tmp_path):
    params = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7, "Seed": 1, "Size": "64x64", **settings.to_infotext()}
    text = format_parameters("a cat, (fluffy:1.2)", "blurry\nlowres", params)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", text)
    prompt, negative, parsed = parse_parameters(read_png_parameters(path))
    assert (prompt, negative) == ("a cat, (fluffy:1.2)", "blurry\nlowres")
    assert parsed["Size-1"] == "64" and parsed["Steps"] == "20"
    assert GCFGSettings.from_infotext(parsed) == settings


def test_disabled_writes_nothing_and_missing_keys_default():
    assert GCFGSettings(terms=TERMS).to_infotext() == {}
    assert GCFGSettings.from_infotext({"Steps": "20"}) == GCFGSettings()
    assert GCFGSettings.from_infotext({"GCFG": "True", "GCFG concept weight": "3"}) == GCFGSettings(
        enabled=True, concept_weight=3.0)


def test_values_are_written_readably():
    info = GCFGSettings(enabled=True, concept_weight=2.0, terms="+1 x").to_infotext()
    assert info == {"GCFG": "True", "GCFG concept weight": "2", "GCFG terms": "+1 x"}  # defaults are not written
    assert GCFGSettings(enabled=True, negative_scale=-0.5).to_infotext() == {"GCFG": "True",
                                                                            "GCFG negative scale": "-0.5"}


@pytest.mark.parametrize(("values", "message"), [
    ({"concept_weight": "lots"}, "concept_weight: expected a number, got 'lots'"),
    ({"concept_weight": 99.0}, r"concept_weight: 99 is outside \[-30, 30\]"),
    ({"negative_scale": float("nan")}, "negative_scale: expected a finite number"),
    ({"enabled": "yes"}, "enabled: expected true or false"),
    ({"prior": "a\nb"}, "prior: expected one line"),
])
def test_validation_names_the_parameter(values, message):
    with pytest.raises(ValueError, match=message):
        GCFGSettings(**values)


def test_bad_terms_fail_on_construction_with_position():
    with pytest.raises(TermSyntaxError, match="line 2, column 1"):
        GCFGSettings(terms="+1 ok\nbad")


def test_from_infotext_and_from_dict_errors():
    with pytest.raises(ValueError, match="infotext 'GCFG negative scale': negative_scale: expected a number"):
        GCFGSettings.from_infotext({"GCFG negative scale": "strong"})
    with pytest.raises(ValueError, match=r"unknown GCFG parameter\(s\) \['weight'\]"):
        GCFGSettings.from_dict({"weight": 1})
    assert GCFGSettings.from_dict({"enabled": True, "negative_scale": "classic"}) == GCFGSettings(enabled=True)


def test_quote_follows_the_webui_rule():
    assert quote("plain text") == "plain text"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote("a\nb") == '"a\\nb"'


def test_parses_a_webui_infotext():
    text = ("masterpiece, 1girl\nsecond line\nNegative prompt: lowres, bad anatomy\n"
            'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, '
            'Model hash: 6ce0161689, Model: v1-5, GCFG terms: "+4 x, y\\n-1 z", Version: v1.10.1')
    prompt, negative, params = parse_parameters(text)
    assert prompt == "masterpiece, 1girl\nsecond line" and negative == "lowres, bad anatomy"
    assert params["GCFG terms"] == "+4 x, y\n-1 z" and params["Size-2"] == "768" and params["Version"] == "v1.10.1"


def test_bad_infotext_key_is_refused():
    with pytest.raises(ValueError, match="infotext key 'GCFG.terms'"):
        format_parameters("p", "", {"GCFG.terms": "x"})
