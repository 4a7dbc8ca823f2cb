"""What follows the tiles (stitch -> export -> QC), against a stand-in for the other nodes."""
from pathlib import Path

import pytest

from wsi_acquisition.scan_outputs import (EXPORT_NODE_WAIT_S, ExportReply, ExportWhileStitching, MosaicState,
                                          OutputTimeouts, finish_scan, wait_for_mosaic)
from wsi_acquisition.scan_request import ScanError, ScanErrorCode, ScanRequest

TIMEOUTS = OutputTimeouts(stitch_s=900.0, stitch_start_s=30.0, export_s=3600.0)


class FakeGraph:
    """The stitching and export nodes as scan_outputs sees them; waiting advances a fake clock."""

    def __init__(self, running=True, states=None, latest=None, export_reply=ExportReply(True, "", ("a.ome.tif",))):
        self.now = 0.0
        self.running = running
        self.states = dict(states or {})
        self.latest = latest
        self.export_reply = export_reply
        self.export_node = True
        self.exported = []
        self.events = {}            # time -> change, applied when the clock passes it

    def clock(self):
        return self.now

    def stitcher_running(self):
        return self.running

    def mosaic_state(self, scan_id):
        return self.states.get(scan_id)

    def latest_mosaic_state(self):
        return self.latest

    def wait_for_mosaic_news(self, timeout_s):
        self.now += timeout_s
        for at in [t for t in self.events if t <= self.now]:
            self.events.pop(at)(self)

    def start_export(self, job):
        if not self.export_node:
            return None
        self.exported.append(FakeExportRun(job, self.export_reply))
        return self.exported[-1]


class FakeExportRun:
    def __init__(self, job, reply):
        self.job, self.reply, self.cancelled = job, reply, False

    def result(self, should_cancel, timeout_s):
        return self.reply

    def cancel(self):
        self.cancelled = True


def request(tmp_path, formats=("ome-tiff",)):
    return ScanRequest(scan_id="s1", output_dir=tmp_path, region_um=(0.0, 0.0, 1.0, 1.0), output_formats=formats)


def never():
    return False


def test_the_final_mosaic_is_exported_under_the_scan_s_name(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False)})
    graph.events[5.0] = lambda g: g.states.update(s1=MosaicState(True, True, "", "/m.zarr", ""))
    outputs = finish_scan(request(tmp_path), 4, ScanErrorCode.NONE, "", graph,
                          never, TIMEOUTS, qc_report=False, clock=graph.clock)
    assert outputs.code == ScanErrorCode.NONE and outputs.output_uris == ["a.ome.tif"]
    job = graph.exported[0].job
    assert (job.mosaic_uri, job.output_name, job.formats) == ("/m.zarr", "s1", ("ome-tiff",))
    assert not job.follow_stitching
    assert Path(job.output_dir) == tmp_path / "s1" and 5.0 <= graph.now < 6.0


def test_cancel_ends_the_wait_for_a_mosaic_that_will_not_come(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False)})
    cancel_at = 3.0
    outputs = finish_scan(request(tmp_path), 4, ScanErrorCode.NONE, "", graph,
                          lambda: graph.now >= cancel_at, TIMEOUTS, qc_report=False, clock=graph.clock)
    assert outputs.code == ScanErrorCode.CANCELED and "waiting for the mosaic" in outputs.message
    assert graph.now < cancel_at + 0.5 and not graph.exported


def test_a_stitching_node_that_goes_away_fails_the_scan_at_once(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False)})
    graph.events[20.0] = lambda g: setattr(g, "running", False)
    with pytest.raises(ScanError, match="output formats need a stitching node, and none is running") as raised:
        wait_for_mosaic("s1", graph, never, TIMEOUTS, graph.clock)
    assert raised.value.code == ScanErrorCode.STITCHING and graph.now < 21.0


def test_a_stitching_node_that_never_took_the_scan_fails_it_after_the_start_timeout(tmp_path):
    graph = FakeGraph(latest=MosaicState(finished=True))          # idle, its last scan long finished
    with pytest.raises(ScanError, match="never took scan s1") as raised:
        wait_for_mosaic("s1", graph, never, TIMEOUTS, graph.clock)
    assert raised.value.code == ScanErrorCode.STITCHING and 30.0 < graph.now < 31.0


def test_a_stitching_node_still_finishing_another_scan_is_waited_for(tmp_path):
    graph = FakeGraph(latest=MosaicState(finished=False))         # busy with the scan before
    graph.events[120.0] = lambda g: g.states.update(s1=MosaicState(True, True, "", "/m.zarr", ""))
    assert wait_for_mosaic("s1", graph, never, TIMEOUTS, graph.clock).mosaic_uri == "/m.zarr"


def test_a_failed_scan_is_not_stitched_and_keeps_its_error(tmp_path):
    graph = FakeGraph(running=False)
    outputs = finish_scan(request(tmp_path), 0, ScanErrorCode.CAMERA, "camera died",
                          graph, never, TIMEOUTS, qc_report=True, clock=graph.clock)
    assert (outputs.code, outputs.message, outputs.qc_index) == (ScanErrorCode.CAMERA, "camera died", None)


def test_an_export_failure_is_the_scan_s_export_error(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(True, True, "", "/m.zarr", "")},
                      export_reply=ExportReply(False, "disk full"))
    outputs = finish_scan(request(tmp_path), 4, ScanErrorCode.NONE, "", graph, never,
                          TIMEOUTS, qc_report=False, clock=graph.clock)
    assert (outputs.code, outputs.message) == (ScanErrorCode.EXPORT, "disk full")
    assert outputs.mosaic.mosaic_uri == "/m.zarr" and outputs.output_uris == []


def test_the_export_starts_once_the_stitching_node_names_the_mosaic_and_reads_it_as_it_is_stitched(tmp_path):
    graph = FakeGraph()
    following = ExportWhileStitching(request(tmp_path), graph)
    following.poll()                                        # no word from the stitching node yet
    graph.states["s1"] = MosaicState(finished=False, mosaic_uri="/m.zarr")
    following.poll()
    following.poll()                                        # one export, whatever the number of tiles after
    assert len(graph.exported) == 1 and following.run is graph.exported[0]
    job = graph.exported[0].job
    assert job.follow_stitching and job.mosaic_uri == "/m.zarr"
    assert job.manifest_uri == str(tmp_path / "s1" / "manifest.json") and job.output_name == "s1"
    graph.states["s1"] = MosaicState(True, True, "", "/m.zarr", "")
    outputs = finish_scan(request(tmp_path), 4, ScanErrorCode.NONE, "", graph,
                          never, TIMEOUTS, qc_report=False, clock=graph.clock, export_started=following.run)
    assert outputs.code == ScanErrorCode.NONE and outputs.output_uris == ["a.ome.tif"]
    assert len(graph.exported) == 1 and not following.run.cancelled     # the one started, not a second


def test_a_scan_without_formats_starts_no_export_while_stitching(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False, mosaic_uri="/m.zarr")})
    following = ExportWhileStitching(request(tmp_path, formats=()), graph)
    following.poll()
    assert following.run is None and graph.exported == []


@pytest.mark.parametrize("failure", ["tiles", "stitching"])
def test_a_scan_that_fails_cancels_the_export_started_while_stitching(tmp_path, failure):
    graph = FakeGraph(states={"s1": MosaicState(finished=False, mosaic_uri="/m.zarr")})
    following = ExportWhileStitching(request(tmp_path), graph)
    following.poll()
    code = ScanErrorCode.CAMERA if failure == "tiles" else ScanErrorCode.NONE
    graph.states["s1"] = MosaicState(True, False, "registration failed", "/m.zarr", "")
    outputs = finish_scan(request(tmp_path), 4, code, "camera died", graph, never,
                          TIMEOUTS, qc_report=False, clock=graph.clock, export_started=following.run)
    assert outputs.code == (ScanErrorCode.CAMERA if failure == "tiles" else ScanErrorCode.STITCHING)
    assert following.run.cancelled and len(graph.exported) == 1


def test_no_export_node_fails_the_scan_s_export_after_the_wait(tmp_path, monkeypatch):
    import wsi_acquisition.scan_outputs as scan_outputs
    monkeypatch.setattr(scan_outputs.time, "sleep", lambda s: None)
    graph = FakeGraph(states={"s1": MosaicState(True, True, "", "/m.zarr", "")})
    graph.export_node = False
    clock = iter(range(0, 1000)).__next__       # one second per look
    outputs = finish_scan(request(tmp_path), 4, ScanErrorCode.NONE, "", graph, never,
                          TIMEOUTS, qc_report=False, clock=clock)
    assert (outputs.code, outputs.message) == (ScanErrorCode.EXPORT, "output formats need an export node, and none "
                                                                      "answers")
    assert EXPORT_NODE_WAIT_S < clock() < EXPORT_NODE_WAIT_S + 5
