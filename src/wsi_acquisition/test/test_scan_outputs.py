"""What follows the tiles (stitch -> export -> QC), against a stand-in for the other nodes."""
from pathlib import Path

import pytest

from wsi_acquisition.scan_outputs import (ExportReply, MosaicState, OutputTimeouts, finish_scan, wait_for_mosaic)
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

    def export(self, job, should_cancel, timeout_s):
        self.exported.append(job)
        return self.export_reply


def request(tmp_path, formats=("ome-tiff",)):
    return ScanRequest(scan_id="s1", output_dir=tmp_path, region_um=(0.0, 0.0, 1.0, 1.0), output_formats=formats)


def never():
    return False


def test_the_final_mosaic_is_exported_under_the_scan_s_name(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False)})
    graph.events[5.0] = lambda g: g.states.update(s1=MosaicState(True, True, "", "/m.zarr", ""))
    outputs = finish_scan(request(tmp_path), tmp_path / "s1" / "manifest.json", 4, ScanErrorCode.NONE, "", graph,
                          never, TIMEOUTS, qc_report=False, clock=graph.clock)
    assert outputs.code == ScanErrorCode.NONE and outputs.output_uris == ["a.ome.tif"]
    job = graph.exported[0]
    assert (job.mosaic_uri, job.output_name, job.formats) == ("/m.zarr", "s1", ("ome-tiff",))
    assert Path(job.output_dir) == tmp_path / "s1" and 5.0 <= graph.now < 6.0


def test_cancel_ends_the_wait_for_a_mosaic_that_will_not_come(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(finished=False)})
    cancel_at = 3.0
    outputs = finish_scan(request(tmp_path), tmp_path / "manifest.json", 4, ScanErrorCode.NONE, "", graph,
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
    outputs = finish_scan(request(tmp_path), tmp_path / "manifest.json", 0, ScanErrorCode.CAMERA, "camera died",
                          graph, never, TIMEOUTS, qc_report=True, clock=graph.clock)
    assert (outputs.code, outputs.message, outputs.qc_index) == (ScanErrorCode.CAMERA, "camera died", None)


def test_an_export_failure_is_the_scan_s_export_error(tmp_path):
    graph = FakeGraph(states={"s1": MosaicState(True, True, "", "/m.zarr", "")},
                      export_reply=ExportReply(False, "disk full"))
    outputs = finish_scan(request(tmp_path), tmp_path / "manifest.json", 4, ScanErrorCode.NONE, "", graph, never,
                          TIMEOUTS, qc_report=False, clock=graph.clock)
    assert (outputs.code, outputs.message) == (ScanErrorCode.EXPORT, "disk full")
    assert outputs.mosaic.mosaic_uri == "/m.zarr" and outputs.output_uris == []
