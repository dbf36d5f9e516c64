"""Stop strings across token boundaries and UTF-8 characters split across tokens."""

from __future__ import annotations

from microserve.engines.llamacpp.sequence import StopMatcher, TextAssembler


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_pieces_is_not_emitted() -> None:
    assert feed(StopMatcher(["END"]), ["hello E", "N", "D more"]) == ("hello ", True)


def test_partial_match_that_fails_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ab ST") == ("ab ", False)
    assert matcher.push("ART") == ("START", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed(StopMatcher(["world", "lo"]), ["hello world"]) == ("hel", True)


def test_held_text_is_flushed_at_the_end() -> None:
    assert feed(StopMatcher(["xyz"]), ["abc x"]) == ("abc x", False)


def test_no_stops_passes_through() -> None:
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_utf8_character_split_across_tokens() -> None:
    pieces = {1: "é".encode()[:1], 2: "é".encode()[1:], 3: b" ok", 4: "🙂".encode()[:2], 5: "🙂".encode()[2:]}
    text = TextAssembler(pieces.__getitem__, [])
    emitted = [text.push(t)[0] for t in (1, 2, 3, 4, 5)]
    assert emitted == ["", "é", " ok", "", "🙂"]
    assert text.finish() == ""


def test_stop_string_made_of_multibyte_characters() -> None:
    pieces = {1: b"a", 2: "日".encode()[:2], 3: "日".encode()[2:], 4: "本".encode()}
    text = TextAssembler(pieces.__getitem__, ["日本"])
    out = [text.push(t) for t in (1, 2, 3, 4)]
    assert out[-1] == ("", True)
    assert "".join(o[0] for o in out) == "a"


def test_truncated_utf8_at_the_end_is_replaced_not_dropped_silently() -> None:
    text = TextAssembler({1: b"x\xe2\x82"}.__getitem__, [])
    assert text.push(1) == ("x", False)
    assert text.finish() == "\ufffd"
