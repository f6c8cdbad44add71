"""The web dashboard's shared pieces: the series, percentiles, the event log, the SSE stream, the page files."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from twinproxy import __version__
from twinproxy.stats import LATENCY_BUCKETS
from twinproxy.web.events import EventLog
from twinproxy.web.resources import EventStream, PageFiles, series_answer
from twinproxy.web.series import Series, bucket_deltas, bucket_percentile, rate


def test_rate_is_never_negative_and_zero_without_time() -> None:
    assert rate(10, 30, 2.0) == 10.0
    assert rate(30, 10, 2.0) == 0.0          # a restarted process
    assert rate(None, 10, 1.0) == 0.0
    assert rate(1, 2, 0.0) == 0.0


def test_bucket_deltas_take_a_reset_as_a_new_start() -> None:
    assert bucket_deltas([1, 2, 3], [2, 2, 5]) == [1, 0, 2]
    assert bucket_deltas([5, 2, 3], [2, 2, 5]) == [2, 2, 5]
    assert bucket_deltas(None, [1, 1]) == [1, 1]


def test_percentile_interpolates_inside_its_bucket() -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert bucket_percentile(counts, 0.99) is None
    counts[3] = 100                      # all between 0.5 ms and 1 ms
    assert abs(bucket_percentile(counts, 0.5) - 0.00075) < 1e-9
    assert abs(bucket_percentile(counts, 1.0) - 0.001) < 1e-9
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[-1] = 1                       # beyond the last bound: its lower bound
    assert bucket_percentile(counts, 0.99) == LATENCY_BUCKETS[-1]


def test_series_keeps_its_limit_and_answers_a_window() -> None:
    series = Series(limit=3)
    for second in range(5):
        series.add(float(second), second * 10.0, None)
    document = series.document(4.0, 1.5, 1.0)
    assert [p["t"] for p in document["points"]] == [3.0, 4.0]
    assert len(series.document(4.0, 100, 1.0)["points"]) == 3


def test_event_log_numbers_bounds_and_tells_listeners() -> None:
    clock = Clock()
    log = EventLog(clock.seconds, keep=2)
    seen = []
    stop = log.listen(seen.append)
    for index in range(3):
        log.add("eject", f"s{index}", "text")
    assert [e["id"] for e in log.since(None)] == [2, 3]
    assert [e["id"] for e in log.since(2)] == [3]
    stop()
    log.add("up", "s", "t")
    assert len(seen) == 3


def test_event_log_names_its_stream_in_every_event_and_an_id_from_another_log_gets_all() -> None:
    clock = Clock()
    log, restarted = EventLog(clock.seconds), EventLog(clock.seconds)
    assert log.stream and restarted.stream and log.stream != restarted.stream
    first = log.add("eject", "s1", "x")
    assert first["stream"] == log.stream
    restarted.add("restore", "s1", "y")
    restarted.add("up", "s1", "z")
    # A page still holding id 7 of the old process: the new log's ids are all below it.
    assert [e["id"] for e in restarted.since(7)] == [1, 2]
    assert [e["id"] for e in restarted.since(2)] == []


def _request(path: bytes, args: dict = None) -> DummyRequest:
    request = DummyRequest([part for part in path.split(b"/") if part])
    request.args = args or {}
    return request


def test_event_stream_replays_after_last_event_id_then_pushes() -> None:
    clock = Clock()
    log = EventLog(clock.seconds)
    log.add("audit", "a", "first")
    log.add("audit", "b", "second")
    stream = EventStream(log, clock)
    request = _request(b"")
    request.requestHeaders.setRawHeaders(b"last-event-id", [b"1"])
    stream.render(request)
    body = b"".join(request.written)
    assert b"id: 2\n" in body and b"id: 1\n" not in body
    log.add("generation", "cluster", "3")
    assert b"id: 3\n" in request.written[-1]
    clock.advance(15)
    assert request.written[-1] == b": keep-alive\n\n"
    stream.close()
    assert request.finished


def test_event_stream_json_fallback() -> None:
    clock = Clock()
    log = EventLog(clock.seconds)
    log.add("eject", "s1", "x")
    log.add("restore", "s1", "y")
    stream = EventStream(log, clock)
    body = json.loads(stream.render(_request(b"", {b"format": [b"json"], b"since": [b"1"]})))
    assert [e["kind"] for e in body["events"]] == ["restore"] and body["last_id"] == 2
    assert body["stream"] == log.stream and body["events"][0]["stream"] == log.stream
    stream.close()


def test_event_stream_last_event_id_wins_over_since() -> None:
    clock = Clock()
    log = EventLog(clock.seconds)
    for index in range(4):
        log.add("audit", f"s{index}", "x")
    stream = EventStream(log, clock)
    # A browser's reconnect: its original URL (?since=1) and the id it read last (3).
    request = _request(b"", {b"since": [b"1"]})
    request.requestHeaders.setRawHeaders(b"last-event-id", [b"3"])
    stream.render(request)
    body = b"".join(request.written)
    assert b"id: 4\n" in body and b"id: 2\n" not in body and b"id: 3\n" not in body
    # Without the header, ?since= is used.
    fresh = _request(b"", {b"since": [b"2"]})
    stream.render(fresh)
    assert b"id: 3\n" in b"".join(fresh.written) and b"id: 2\n" not in b"".join(fresh.written)
    answer = _request(b"", {b"format": [b"json"], b"since": [b"1"]})
    answer.requestHeaders.setRawHeaders(b"last-event-id", [b"3"])
    assert [e["id"] for e in json.loads(stream.render(answer))["events"]] == [4]
    stream.close()


def test_page_files_write_the_version_and_refuse_paths() -> None:
    page = PageFiles()
    index = page.render_GET(_request(b""))
    assert __version__.encode() in index and b"__TWINPROXY_VERSION__" not in index
    request = _request(b"../setup.cfg")
    assert page.render_GET(request) == b"not found\n" and request.responseCode == 404


def test_series_answer_bounds_the_window() -> None:
    series = Series()
    series.add(10.0, 5.0, 1.5)
    request = _request(b"", {b"seconds": [b"nonsense"]})
    document = json.loads(series_answer(request, series, 10.0, 1.0))
    assert document["points"][0]["ops_per_second"] == 5.0


def test_event_stream_a_failing_write_ends_that_stream_only_and_the_heartbeat_goes_on() -> None:
    clock = Clock()
    log = EventLog(clock.seconds)
    stream = EventStream(log, clock)
    broken, good = _request(b""), _request(b"")
    stream.render(broken)
    stream.render(good)

    def gone(data: bytes) -> None:
        raise RuntimeError("Request.write called on a request after Request.finish was called.")
    broken.write = gone
    clock.advance(15)
    assert good.written[-1] == b": keep-alive\n\n"
    log.add("audit", "a", "after")
    assert b"after" in good.written[-1]
    clock.advance(15)
    assert good.written[-1] == b": keep-alive\n\n" and stream._heartbeat.running
    broken.finish = lambda: (_ for _ in ()).throw(RuntimeError("finished"))
    stream.close()
    assert good.finished


def test_event_stream_refuses_beyond_max_streams() -> None:
    from twinproxy.web import resources

    clock = Clock()
    stream = EventStream(EventLog(clock.seconds), clock)
    for _ in range(resources.MAX_STREAMS):
        stream.render(_request(b""))
    request = _request(b"")
    body = stream.render(request)
    assert request.responseCode == 503 and b"format=json" in body
    # The JSON fallback still answers.
    assert json.loads(stream.render(_request(b"", {b"format": [b"json"]})))["events"] == []
    stream.close()


def test_add_counts_and_percentiles_shared_by_both_pages() -> None:
    from twinproxy.web.series import add_counts, percentiles

    assert add_counts(None, [1, 2]) == [1, 2] and add_counts([1, 2], [3, 4]) == [4, 6]
    assert add_counts([1, 2, 3], [3, 4]) == [3, 4]          # another layout: the new one alone
    assert percentiles(None) == (None, None) and percentiles([0] * (len(LATENCY_BUCKETS) + 1)) == (None, None)
    counts = [0, 0, 4] + [0] * (len(LATENCY_BUCKETS) - 2)
    p50, p99 = percentiles(counts)
    assert p50 == round(bucket_percentile(counts, 0.5) * 1000, 3)
    assert p99 == round(bucket_percentile(counts, 0.99) * 1000, 3)
