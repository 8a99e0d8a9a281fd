"""app.plots: every chart is well-formed XML, counts right, and escapes hostile labels."""

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from markupsafe import Markup
from PIL import Image

from app import plots

NS = {"svg": "http://www.w3.org/2000/svg"}
HOSTILE = '<script>alert("x")</script> & \'q\''


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("role") == "img"
    assert root.find("svg:title", NS) is not None and root.find("svg:title", NS).text
    assert "style=" not in svg, "presentation attributes only, so a strict CSP holds"
    return root


def with_class(root: ET.Element, tag: str, css: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{{{NS['svg']}}}{tag}") if css in (e.get("class") or "").split()]


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{{{NS['svg']}}}text")]


def assert_escaped(svg: str, root: ET.Element) -> None:
    assert "<script" not in svg
    assert "&lt;script&gt;" in svg
    # The label survives the round trip exactly: escaped, not mangled.
    titles = ["".join(t.itertext()) for t in root.iter(f"{{{NS['svg']}}}title")]
    assert any(HOSTILE in title for title in titles)


class TestWeightBars:
    items = [("stripes", 1.2), ("water", -0.7), ("fur", 0.3), (HOSTILE, -0.1)]

    def test_one_bar_per_item_coloured_by_sign(self):
        root = parse(plots.weight_bars(self.items, "tiger"))
        assert len(with_class(root, "rect", "bar")) == 4
        assert len(with_class(root, "rect", "pos")) == 2
        assert len(with_class(root, "rect", "neg")) == 2
        assert {e.get("fill") for e in with_class(root, "rect", "pos")} == {plots.POSITIVE}
        assert len(with_class(root, "line", "zero")) == 1

    def test_sorted_strongest_positive_first_with_values(self):
        root = parse(plots.weight_bars(self.items, "tiger"))
        order = [g.get("data-concept") for g in with_class(root, "g", "row")]
        assert order == ["stripes", "fur", HOSTILE, "water"]
        assert "+1.200" in texts(root) and "\u22120.700" in texts(root)

    def test_top_keeps_strongest_of_each_sign(self):
        root = parse(plots.weight_bars(self.items, "tiger", top=1))
        assert [g.get("data-concept") for g in with_class(root, "g", "row")] == ["stripes", "water"]

    def test_hostile_label_is_escaped(self):
        svg = plots.weight_bars(self.items, HOSTILE)
        assert_escaped(svg, parse(svg))

    def test_links_when_asked(self):
        root = parse(plots.weight_bars(self.items[:2], "t", concept_href=lambda c: f"#c-{c}"))
        links = list(root.iter("{http://www.w3.org/2000/svg}a"))
        assert [a.get("href") for a in links] == ["#c-stripes", "#c-water"]

    def test_empty_and_non_finite(self):
        root = parse(plots.weight_bars([], "nothing"))
        assert with_class(root, "rect", "bar") == []
        with pytest.raises(ValueError, match="water"):
            plots.weight_bars([("water", float("nan"))], "t")

    def test_returns_markup_so_templates_need_no_safe(self):
        assert isinstance(plots.weight_bars(self.items, "t"), Markup)


class TestHeatmap:
    def test_cells_for_ten_classes_by_sixty_concepts(self):
        rng = np.random.default_rng(0)
        rows = [f"class {i}" for i in range(10)]
        cols = [f"concept {j}" for j in range(60)]
        root = parse(plots.heatmap(rows, cols, rng.normal(size=(10, 60)), "weights", cell=4))
        cells = with_class(root, "rect", "cell")
        assert len(cells) == 600
        assert min(float(c.get("width")) for c in cells) + 1 >= 8  # cell pitch never below 8 px
        column_labels = with_class(root, "text", "col-label")
        assert len(column_labels) == 60 and all("rotate(-60" in t.get("transform") for t in column_labels)
        assert len(with_class(root, "g", "legend")) == 1
        assert root.find(".//svg:linearGradient", NS) is not None

    def test_diverging_colours_centred_at_zero(self):
        root = parse(plots.heatmap(["a"], ["neg", "zero", "pos", "gap"], [[-2.0, 0.0, 2.0, float("nan")]], "t"))
        fill = {c.get("data-col"): c.get("fill") for c in with_class(root, "rect", "cell")}
        red, green, blue = (int(fill["pos"][k:k + 2], 16) for k in (1, 3, 5))
        assert blue > red  # positive is blue
        red, green, blue = (int(fill["neg"][k:k + 2], 16) for k in (1, 3, 5))
        assert red > blue  # negative is orange
        assert all(int(fill["zero"][k:k + 2], 16) > 240 for k in (1, 3, 5))  # zero is near-white
        assert fill["gap"] == "#cbd2d9"

    def test_shape_must_match_labels(self):
        with pytest.raises(ValueError, match="shape"):
            plots.heatmap(["a", "b"], ["x"], [[1.0, 2.0]], "t")

    def test_hostile_labels_are_escaped(self):
        svg = plots.heatmap([HOSTILE], [HOSTILE], [[1.0]], HOSTILE)
        assert_escaped(svg, parse(svg))


class TestWaterfall:
    contributions = [("stripes", 1.5), ("water", -0.7), ("orange fur", 0.9), ("tail", 0.05)]

    def test_steps_from_bias_to_total_with_not_labels(self):
        root = parse(plots.waterfall(self.contributions, 0.2, "tiger"))
        steps = with_class(root, "g", "step")
        assert [s.get("class").split()[1] for s in steps] == ["bias", "pos", "neg", "pos", "pos", "total"]
        labels = texts(root)
        assert "NOT water" in labels and "water" not in labels
        assert "logit for tiger" in labels
        assert "1.95" in labels  # 0.2 + 1.5 - 0.7 + 0.9 + 0.05

    def test_concept_steps_carry_data_concept_and_links(self):
        root = parse(plots.waterfall(self.contributions, 0.0, "tiger", concept_href=lambda c: "/c/" + c))
        assert [g.get("data-concept") for g in root.iter(f"{{{NS['svg']}}}g") if g.get("data-concept")] == [
            "stripes", "water", "orange fur", "tail"]
        assert len(list(root.iter(f"{{{NS['svg']}}}a"))) == 4

    def test_top_lumps_the_rest_and_keeps_the_total(self):
        root = parse(plots.waterfall(self.contributions, 0.2, "tiger", top=2))
        assert len(with_class(root, "g", "pos")) + len(with_class(root, "g", "neg")) == 2
        assert len(with_class(root, "g", "other")) == 1
        assert "1.95" in texts(root)

    def test_hostile_concept_is_escaped(self):
        svg = plots.waterfall([(HOSTILE, -1.0)], 0.0, HOSTILE)
        root = parse(svg)
        assert "<script" not in svg
        assert f"NOT {HOSTILE}"[:36 - 1] in "".join(texts(root))


class TestMetricLines:
    def test_one_line_per_split_with_markers_and_legend(self):
        series = {"train": [0.9, 0.92, None, 0.95], "test": [0.8, 0.81, 0.83, 0.84], "shifted": [0.5, 0.6, 0.7, 0.72]}
        root = parse(plots.metric_lines(series, ["v1", "v2", "v3", "v4"], "accuracy"))
        lines = with_class(root, "path", "line")
        assert len(lines) == 3
        assert lines[0].get("d").count("M") == 2  # the missing v3 leaves a gap
        assert len(with_class(root, "circle", "marker")) == 11
        assert [t.text for t in with_class(root, "text", "legend-label")] == ["train", "test", "shifted"]

    def test_lengths_must_match(self):
        with pytest.raises(ValueError, match="train"):
            plots.metric_lines({"train": [0.1]}, ["v1", "v2"], "t")

    def test_single_version_and_hostile_split(self):
        svg = plots.metric_lines({HOSTILE: [0.5]}, ["v1"], "t")
        assert_escaped(svg, parse(svg))


class TestDeltaBars:
    def test_before_and_after_bars_with_signed_changes(self):
        rows = [("train", 0.90, 0.92), ("shifted", 0.60, 0.55), ("test", 0.8, 0.8)]
        root = parse(plots.delta_bars(rows, "preview", highlight=["shifted"]))
        assert len(with_class(root, "rect", "before")) == 3
        assert len(with_class(root, "rect", "after")) == 3
        deltas = {t.text: t.get("class") for t in with_class(root, "text", "delta")}
        assert deltas == {"+2.0 pts": "delta pos", "\u22125.0 pts": "delta neg", "\u00b10.0 pts": "delta zero"}
        assert len(with_class(root, "rect", "highlight")) == 1

    def test_hostile_group_is_escaped(self):
        svg = plots.delta_bars([(HOSTILE, 0.5, 0.6)], "t")
        assert_escaped(svg, parse(svg))


class TestOverlay:
    image = Image.new("RGB", (96, 64), (128, 128, 128))

    def test_png_has_the_image_size(self):
        png = plots.overlay_png(self.image, np.random.default_rng(0).random((7, 7)), 0.5)
        out = Image.open(io.BytesIO(png))
        assert out.format == "PNG" and out.size == (96, 64)

    def test_changes_when_the_map_changes(self):
        left = np.zeros((4, 4)); left[:, :2] = 1
        right = np.zeros((4, 4)); right[:, 2:] = 1
        a = np.asarray(Image.open(io.BytesIO(plots.overlay_png(self.image, left))))
        b = np.asarray(Image.open(io.BytesIO(plots.overlay_png(self.image, right))))
        assert not np.array_equal(a, b)
        assert a[:, :10].mean() != a[:, -10:].mean()  # the hot side is coloured differently

    def test_opacity_zero_is_the_original_and_bad_input_is_refused(self):
        out = np.asarray(Image.open(io.BytesIO(plots.overlay_png(self.image, np.ones((3, 3)), opacity=0.0))))
        assert np.array_equal(out, np.asarray(self.image))
        with pytest.raises(ValueError, match="opacity"):
            plots.overlay_png(self.image, np.ones((3, 3)), opacity=1.5)
        with pytest.raises(ValueError, match="2-D"):
            plots.overlay_png(self.image, np.ones(3))
        with pytest.raises(ValueError, match="colour scale"):
            plots.overlay_png(self.image, np.ones((3, 3)), cmap="jet")

    def test_flat_and_nan_maps_and_other_modes(self):
        grey = Image.new("L", (20, 10), 50)
        heat = np.full((2, 2), np.nan)
        assert Image.open(io.BytesIO(plots.overlay_png(grey, heat))).size == (20, 10)
        signed_map = np.array([[-1.0, 1.0]])
        assert Image.open(io.BytesIO(plots.overlay_png(grey, signed_map, cmap="diverging"))).mode == "RGB"

    def test_lookup_table_is_perceptually_ordered(self):
        table = plots._lookup_table("viridis").astype(float)
        luminance = table @ np.array([0.2126, 0.7152, 0.0722])
        assert table.shape == (256, 3) and np.all(np.diff(luminance) > -1.0)  # dark to light

    def test_colorbar(self):
        root = parse(plots.colorbar_svg(-1.0, 2.5, label=HOSTILE))
        assert root.find(".//svg:linearGradient", NS) is not None
        assert {"\u22121.00", "0.75", "2.50"} <= set(texts(root))
