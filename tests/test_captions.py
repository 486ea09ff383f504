"""Caption processing rules, weighted-caption parsing and caption files.

Where a result is random, the expected value is derived by replaying the documented use of the seeded rng
(line choice, then wildcards, then shuffle, then one draw per tag for tag dropout) on plain lists.
"""

from __future__ import annotations

import random

import pytest

from library.config.params import SubsetParams
from library.dataset.captions import parse_weighted_caption, process_caption, read_caption_file
from library.errors import UserError


def subset(**kwargs) -> SubsetParams:
    return SubsetParams(origin="test", **kwargs)


def run(caption: str, sub: SubsetParams, seed: int = 0, epoch: int = 1, step: int = 0, **kwargs) -> str:
    return process_caption(caption, sub, rng=random.Random(seed), epoch=epoch, step=step, **kwargs)


def test_plain_caption_is_untouched():
    assert run("a photo of  sks dog", subset()) == "a photo of  sks dog"


def test_prefix_and_suffix():
    sub = subset(caption_prefix="masterpiece,", caption_suffix=", from side")
    assert run("1girl, smile", sub) == "masterpiece, 1girl, smile , from side"


def test_caption_dropout_rate():
    assert run("a, b", subset(caption_dropout_rate=1.0, caption_prefix="p")) == ""
    rng = random.Random(5)
    state = rng.getstate()
    assert process_caption("a, b", subset(caption_dropout_rate=0.0), rng=rng, epoch=1, step=0) == "a, b"
    assert rng.getstate() == state  # no randomness used when nothing is random


def test_caption_dropout_rate_draw():
    sub = subset(caption_dropout_rate=0.5)
    for seed in range(20):
        expected = "" if random.Random(seed).random() < 0.5 else "a"
        assert run("a", sub, seed=seed) == expected


def test_caption_dropout_every_n_epochs():
    sub = subset(caption_dropout_every_n_epochs=2)
    results = [run("a, b", sub, epoch=e) for e in range(1, 7)]
    assert results == ["a, b", "", "a, b", "", "a, b", ""]


def test_multiline_without_wildcard_uses_first_line():
    sub = subset(caption_suffix="S")
    assert run("first line\nsecond line\nthird", sub) == "first line S"


def test_multiline_blank_lines_are_ignored():
    assert run("\n  first \r\n\nsecond", subset()) == "first"
    for seed in range(10):
        expected = random.Random(seed).choice(["first", "second"])
        assert run("first\n\n second \n", subset(enable_wildcard=True), seed=seed) == expected


def test_multiline_with_wildcard_chooses_a_line():
    lines = ["1girl, stage", "a girl on a stage", "digital art of a girl"]
    sub = subset(enable_wildcard=True, caption_prefix="P", caption_suffix="S")
    seen = set()
    for seed in range(30):
        expected = f"P {random.Random(seed).choice(lines)} S"
        result = run("\n".join(lines), sub, seed=seed)
        assert result == expected
        seen.add(result)
    assert len(seen) == 3


def test_wildcards():
    sub = subset(enable_wildcard=True)
    seen = set()
    for seed in range(30):
        expected = random.Random(seed).choice(["simple", "white"]) + " background"
        result = run("{simple|white} background", sub, seed=seed)
        assert result == expected
        seen.add(result)
    assert seen == {"simple background", "white background"}


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("1girl, {{retro style}}", "1girl, {retro style}"),
        ("{{a|b}}", "{a|b}"),
        ("x {} y", "x {} y"),
        ("{only}", "only"),
        ("lone { brace", "lone { brace"),
    ],
)
def test_wildcard_escapes(caption, expected):
    assert run(caption, subset(enable_wildcard=True)) == expected


def test_wildcard_inside_escaped_braces():
    for seed in range(10):
        expected = "{" + random.Random(seed).choice(["a", "b"]) + "}"
        assert run("{{{a|b}}}", subset(enable_wildcard=True), seed=seed) == expected


def test_wildcards_need_enable_wildcard():
    assert run("{a|b} {{x}}", subset()) == "{a|b} {{x}}"


def test_two_wildcards_use_rng_in_order():
    rng = random.Random(7)
    expected = f"{rng.choice(['a', 'b', 'c'])} and {rng.choice(['x', 'y'])}"
    assert run("{a|b|c} and {x|y}", subset(enable_wildcard=True), seed=7) == expected


@pytest.mark.parametrize(
    "separator, caption, expected",
    [
        (",", "a,b,  c", "a, b, c"),
        (";", "a; b ;c", "a;b;c"),
        (" | ", "a | b | c", "a | b | c"),
        (".", "red hair. blue eyes", "red hair.blue eyes"),
    ],
)
def test_rejoin_uses_caption_separator(separator, caption, expected):
    sub = subset(caption_separator=separator, keep_tokens=3, shuffle_caption=True)
    assert run(caption, sub) == expected


def test_shuffle_with_semicolon_separator():
    sub = subset(caption_separator=";", shuffle_caption=True)
    for seed in range(5):
        tags = ["a", "b", "c", "d"]
        random.Random(seed).shuffle(tags)
        assert run("a;b;c;d", sub, seed=seed) == ";".join(tags)


def test_shuffle_keeps_first_keep_tokens():
    sub = subset(shuffle_caption=True, keep_tokens=2)
    caption = "sks, dog, red collar, grass, sunny day, looking up"
    results = set()
    for seed in range(10):
        flex = ["red collar", "grass", "sunny day", "looking up"]
        random.Random(seed).shuffle(flex)
        result = run(caption, sub, seed=seed)
        assert result == ", ".join(["sks", "dog"] + flex)
        results.add(result)
    assert len(results) > 1


def test_keep_tokens_separator_never_leaks():
    sub = subset(keep_tokens_separator="|||")
    assert run("1girl, hatsune miku ||| stage, microphone", sub) == "1girl, hatsune miku, stage, microphone"
    assert run("a ||| b ||| c, d", sub) == "a, b, c, d"
    assert run("a ||| b ||| c ||| d", sub) == "a, b, c, d"
    assert run("no separator here, x", sub) == "no separator here, x"


def test_keep_tokens_separator_one_separator_shuffles_the_rest():
    sub = subset(keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=5)
    for seed in range(5):
        flex = ["stage", "microphone", "white shirt", "smile"]
        random.Random(seed).shuffle(flex)
        result = run("1girl, hatsune miku ||| stage, microphone, white shirt, smile", sub, seed=seed)
        assert result == ", ".join(["1girl", "hatsune miku"] + flex)  # separator wins over keep_tokens


def test_keep_tokens_separator_two_separators():
    sub = subset(keep_tokens_separator="|||", shuffle_caption=True)
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    for seed in range(5):
        flex = ["stage", "microphone", "white shirt", "smile"]
        random.Random(seed).shuffle(flex)
        expected = ", ".join(["1girl", "hatsune miku", "vocaloid"] + flex + ["best quality", "rating: general"])
        assert run(caption, sub, seed=seed) == expected


def test_keep_tokens_separator_from_prefix_and_suffix():
    sub = subset(
        keep_tokens_separator="|||",
        shuffle_caption=True,
        caption_prefix="1girl, hatsune miku, vocaloid |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general",
    )
    flex = ["upper body", "smile", "anime screencap"]
    random.Random(3).shuffle(flex)
    expected = ", ".join(["1girl", "hatsune miku", "vocaloid"] + flex + ["masterpiece", "rating: general"])
    assert run("upper body, smile", sub, seed=3) == expected


def test_tag_dropout_all_and_none():
    caption = "sks, dog, grass, sky"
    assert run(caption, subset(caption_tag_dropout_rate=1.0, keep_tokens=1)) == "sks"
    assert run(caption, subset(caption_tag_dropout_rate=1.0)) == ""
    assert run("a ||| b, c ||| d", subset(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||")) == "a, d"
    assert run(caption, subset(caption_tag_dropout_rate=0.0, keep_tokens=1)) == caption


def test_tag_dropout_draws_one_number_per_flexible_tag():
    sub = subset(caption_tag_dropout_rate=0.5, keep_tokens=1)
    for seed in range(10):
        rng = random.Random(seed)
        kept = [t for t in ["dog", "grass", "sky", "tree"] if rng.random() >= 0.5]
        assert run("sks, dog, grass, sky, tree", sub, seed=seed) == ", ".join(["sks"] + kept)


def test_shuffle_then_tag_dropout_order():
    sub = subset(shuffle_caption=True, caption_tag_dropout_rate=0.3)
    rng = random.Random(11)
    tags = ["a", "b", "c", "d", "e"]
    rng.shuffle(tags)
    tags = [t for t in tags if rng.random() >= 0.3]
    assert run("a, b, c, d, e", sub, seed=11) == ", ".join(tags)


def test_token_warmup_progression():
    sub = subset(token_warmup_min=1, token_warmup_step=10)
    caption = "a, b, c, d, e"
    assert run(caption, sub, step=0) == "a"
    assert run(caption, sub, step=3) == "a, b"  # floor(3 * 4 / 10) + 1
    assert run(caption, sub, step=5) == "a, b, c"
    assert run(caption, sub, step=9) == "a, b, c, d"
    assert run(caption, sub, step=10) == caption
    assert run(caption, sub, step=500) == caption


def test_token_warmup_keeps_fixed_tokens():
    sub = subset(token_warmup_min=2, token_warmup_step=4, keep_tokens=1)
    assert run("sks, a, b, c, d, e, f", sub, step=0) == "sks, a, b"
    assert run("sks, a, b, c, d, e, f", sub, step=2) == "sks, a, b, c, d"  # floor(2 * 4 / 4) + 2


def test_token_warmup_ratio_of_max_train_steps_does_not_mutate_subset():
    sub = subset(token_warmup_min=1, token_warmup_step=0.5)
    assert run("a, b, c, d, e", sub, step=5, max_train_steps=20) == "a, b, c"
    assert run("a, b, c, d, e", sub, step=10, max_train_steps=20) == "a, b, c, d, e"
    assert sub.token_warmup_step == 0.5
    assert run("a, b, c, d, e", sub, step=30, max_train_steps=100) == "a, b, c"  # floor(30 * 4 / 50) + 1
    with pytest.raises(ValueError, match="max_train_steps"):
        run("a, b", sub, step=0)


def test_secondary_separator():
    sub = subset(secondary_separator=";;;")
    caption = "1girl, hatsune miku, sky;;;cloud;;;day, outdoors"
    assert run(caption, sub) == "1girl, hatsune miku, sky,cloud,day, outdoors"


def test_secondary_separator_is_one_tag_when_shuffled():
    sub = subset(secondary_separator=";;;", shuffle_caption=True)
    caption = "1girl, hatsune miku, sky;;;cloud;;;day, outdoors"
    for seed in range(5):
        tags = ["1girl", "hatsune miku", "sky;;;cloud;;;day", "outdoors"]
        random.Random(seed).shuffle(tags)
        expected = ", ".join(tags).replace(";;;", ",")
        result = run(caption, sub, seed=seed)
        assert result == expected
        assert "sky,cloud,day" in result


def test_secondary_separator_becomes_custom_separator():
    sub = subset(secondary_separator="::", caption_separator=";")
    assert run("a;b::c", sub) == "a;b;c"


def test_empty_tags_are_dropped():
    assert run("a, , b,", subset(shuffle_caption=True, keep_tokens=9)) == "a, b"


def test_same_seed_same_caption():
    sub = subset(shuffle_caption=True, caption_tag_dropout_rate=0.2, enable_wildcard=True, caption_dropout_rate=0.1)
    caption = "{red|blue} car, street, night, rain, neon, reflections"
    assert run(caption, sub, seed=42) == run(caption, sub, seed=42)
    assert len({run(caption, sub, seed=s) for s in range(20)}) > 5


def _assert_runs(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    assert [w for _, w in actual] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((word))", [("word", 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 0.5 )", [("word", 0.5)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("unbalanced)", [("unbalanced)", 1.0)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)]),
        ("(word:abc)", [("word:abc", 1.1)]),
        ("(w:1.2.3)", [("w:1.2.3", 1.1)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parse_weighted_caption(text, expected):
    _assert_runs(parse_weighted_caption(text), expected)


def test_read_caption_file(tmp_path):
    path = tmp_path / "img.txt"
    path.write_bytes("\ufeff  1girl, smile \r\n\r\n a girl smiling\r\n".encode("utf-8"))
    assert read_caption_file(path) == "1girl, smile\na girl smiling"
    (tmp_path / "one.caption").write_text("sks dog\n", encoding="utf-8")
    assert read_caption_file(tmp_path / "one.caption") == "sks dog"


def test_read_caption_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match="bad.txt.*UTF-8"):
        read_caption_file(bad)
    with pytest.raises(UserError, match="missing.txt"):
        read_caption_file(tmp_path / "missing.txt")
