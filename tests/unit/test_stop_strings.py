from gateway.stop_strings import StopStringMatcher


def feed_all(matcher, pieces):
    out, stop = "", None
    for piece in pieces:
        m = matcher.feed(piece)
        out += m.text
        if m.stop:
            return out, m.stop
    return out + matcher.flush(), stop


def test_no_stops_passes_text_through():
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == ("ab", None)


def test_stop_split_across_pieces():
    assert feed_all(StopStringMatcher(["END"]), ["abc E", "N", "D more"]) == ("abc ", "END")


def test_include_stop_sequence():
    assert feed_all(StopStringMatcher(["END"], include_stop=True), ["abc E", "ND x"]) == ("abc END", "END")


def test_prefix_is_held_back_until_it_cannot_match():
    m = StopStringMatcher(["END"])
    assert m.feed("abc E").text == "abc "
    assert m.feed("N").text == ""
    assert m.feed("x").text == "ENx"


def test_earliest_match_wins_then_longest():
    assert feed_all(StopStringMatcher(["b", "abc"]), ["xabc"]) == ("x", "abc")
    assert feed_all(StopStringMatcher(["cd", "b"]), ["abcd"]) == ("a", "b")


def test_flush_returns_a_prefix_that_never_completed():
    m = StopStringMatcher(["END"])
    assert m.feed("xEN").text == "x"
    assert m.flush() == "EN"


def test_nothing_after_a_stop():
    m = StopStringMatcher(["."])
    assert m.feed("a.b").text == "a"
    assert m.feed("more").text == ""


def test_unicode_stop():
    assert feed_all(StopStringMatcher(["안녕"]), ["하이 안", "녕하세요"]) == ("하이 ", "안녕")
