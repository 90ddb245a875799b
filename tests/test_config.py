from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config, reference

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "laion.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.download.fetch.max_pixels > 0


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output: x\ninput: {path: u.parquet}\ndownload: {image_sise: 256}\n")
    with pytest.raises(ConfigError, match=r"download\.image_sise: unknown key"):
        load_config(p)


def test_bad_value_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output: x\ninput: {path: u.parquet}\ndownload: {resize_mode: squash, fetch: {max_bytes: -1}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "download.resize_mode" in str(exc.value) and "download.fetch.max_bytes" in str(exc.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"output: Field required"):
        load_config(None, ["input.path=u"])


def test_bad_combination():
    with pytest.raises(ConfigError, match="encode_quality must be 0-9"):
        load_config(None, ["output=x", "input.path=u", "download.encode_format=png", "download.encode_quality=95"])


def test_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS[0], ["download.image_size=512", "download.fetch.allow_loopback=false",
                                   "download.disallowed_header_directives=[noai]"])
    assert cfg.download.image_size == 512 and cfg.download.fetch.allow_loopback is False
    assert cfg.download.disallowed_header_directives == ["noai"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(CONFIGS[0], ["download.image_size"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_reference_documents_every_field():
    rows = reference()
    keys = {k for k, _, _ in rows}
    assert {"download.fetch.allow_loopback", "input.preset", "resources.ray_address"} <= keys
    assert all(desc for _, _, desc in rows), "every config field needs a description"


def test_readme_documents_every_config_key():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [k for k, _, _ in reference() if f"`{k}`" not in readme]
    assert not missing, f"README config reference is missing {missing}; regenerate with `tapir config --reference`"
