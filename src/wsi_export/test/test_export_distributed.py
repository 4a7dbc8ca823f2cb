import pytest
from distributed import LocalCluster

from wsi_export.errors import ExportOptionsError
from wsi_export.export import ExportOptions, export_slide

FILE_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.slow
def test_dask_cluster_export_is_byte_identical_to_local(mosaic_path, tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "cluster").mkdir()
    local = export_slide(mosaic_path, tmp_path / "local", "slide", ("ome-tiff", "ome-zarr"),
                         ExportOptions(file_uuid=FILE_UUID))
    # a worker process: jobs, zarr arrays and scratch levels really go through serialisation
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        distributed = export_slide(mosaic_path, tmp_path / "cluster", "slide", ("ome-tiff", "ome-zarr"),
                                   ExportOptions(file_uuid=FILE_UUID, scheduler_address=cluster.scheduler_address))
    assert local.output_paths[0].read_bytes() == distributed.output_paths[0].read_bytes()
    local_chunks = sorted(p.relative_to(local.output_paths[1]) for p in local.output_paths[1].rglob("*"))
    cluster_chunks = sorted(p.relative_to(distributed.output_paths[1])
                            for p in distributed.output_paths[1].rglob("*"))
    assert local_chunks == cluster_chunks
    for relative in local_chunks:
        if (local.output_paths[1] / relative).is_file():
            assert (local.output_paths[1] / relative).read_bytes() == \
                (distributed.output_paths[1] / relative).read_bytes()


def test_unreachable_scheduler_is_an_options_error(mosaic_path, tmp_path):
    with pytest.raises(ExportOptionsError, match="cannot connect to dask scheduler"):
        export_slide(mosaic_path, tmp_path, "slide", options=ExportOptions(
            scheduler_address="tcp://127.0.0.1:9", scheduler_timeout_s=1.0))
    assert list(tmp_path.iterdir()) == []
