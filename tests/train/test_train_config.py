"""Training config: the shipped YAML validates, overrides apply, errors name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ganspect.edge.errors import ConfigError
from ganspect.train.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "train" / "efficient_gan.yaml"


def test_shipped_configs_validate() -> None:
    config = load_train_config(SHIPPED, [])
    # The default recipe: native-pixel tiles of 256 trained on crops of 128, spatial latent, pseudo-defects,
    # the head's score.
    assert (config.tiling.mode, config.model.image_size, config.model.latent) == ("tiles", 256, "spatial")
    assert config.tiling.train_crop == 128
    assert config.pseudo_defects.enabled and config.model.scoring == "segmentation"
    assert config.model.lambda_ == pytest.approx(0.1)
    assert config.calibration.nu == pytest.approx(0.05)  # a quantile 150 held-out normals can measure
    papers = load_train_config(SHIPPED.with_name("efficient_gan_residual.yaml"), [])
    assert (papers.tiling.mode, papers.model.image_size, papers.model.latent) == ("resize", 64, "vector")
    assert papers.model.scoring == "residual" and not papers.pseudo_defects.enabled
    load_train_config(SHIPPED.with_name("anogan.yaml"), [])
    aligned = load_train_config(SHIPPED.with_name("efficient_gan_aligned.yaml"), [])
    assert (aligned.tiling.mode, aligned.model.image_size, aligned.calibration.per_pixel) == ("resize", 128, True)
    assert (aligned.model.residual_polarity, aligned.train.adversarial_weight) == ("darker", 0.0)


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  image_size: 64\n", encoding="utf-8")
    config = load_train_config(
        path, ["train.steps=7", "model.lambda=0.3", "data.augment.hflip=true", "model.heatmap_sigma=null"]
    )
    assert config.train.steps == 7
    assert config.model.lambda_ == pytest.approx(0.3)
    assert config.data.augment.hflip is True
    assert config.model.heatmap_sigma is None
    # The resolved config writes `lambda`, the key users type.
    assert config.to_dict()["model"]["lambda"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("model:\n  image_sise: 64\n", [], "model.image_sise"),
        ("model:\n  image_size: 48\n", [], "model.image_size"),
        ("", ["train.steps=-3"], "train.steps"),
        ("", ["calibration.nu=lots"], "calibration.nu"),
        ("", ["data.augment.rotate=5"], "data.augment.rotate"),
        ("", ["model.channels=2"], "model.channels"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(path, overrides)


def test_a_residual_score_without_the_game_refuses_the_untrained_discriminators_term(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  adversarial_weight: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("model.lambda: 0")):
        load_train_config(path, ["model.lambda=0.1"])
    assert load_train_config(path, ["model.lambda=0"]).train.adversarial_weight == 0


def test_bad_override_syntax_and_files(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("KEY.PATH=VALUE")):
        load_train_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match=re.escape("train.steps is a value")):
        load_train_config(path, ["train.steps.inner=3"])
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(path, [])
    with pytest.raises(ConfigError, match="cannot read"):
        load_train_config(tmp_path / "missing.yaml", [])


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(TrainConfig)


def test_shipped_anogan_config_validates() -> None:
    config = load_train_config(REPO / "configs" / "train" / "anogan.yaml", [])
    assert config.model.kind == "anogan" and config.model.discrimination == "feature_matching"
    assert config.anogan.search_steps == 500
    assert config.train.ema_decay == pytest.approx(0.999)
