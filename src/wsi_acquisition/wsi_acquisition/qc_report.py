"""Scan QC report: one HTML page with PNGs, written beside the scan's manifest.

Sections: the overview with the tile grid, focus (true defocus per tile in simulation, and the
autofocus error where it predicted), registration from the stitching report (residuals at the final
tile positions, each tile's offset from its stage pose, and every tile the stitcher flagged or left
on its stage pose), scan timing, and the outputs. Everything is read from files the pipeline wrote;
nothing needs ROS.
"""
import html
import json
from pathlib import Path

import numpy as np
import tifffile

from wsi_acquisition.focus import FOCUS_MAP, FOCUS_SOURCES
from wsi_common.scan_files import Manifest, RecordedPlan

REPORT_DIR = "qc"


def _save(figure, path: Path, plt) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _grid(plan: RecordedPlan, values: dict[tuple[int, int], float]) -> np.ndarray:
    grid = np.full((plan.grid.rows, plan.grid.cols), np.nan)
    for (row, col), value in values.items():
        grid[row, col] = value
    return grid


def _plot_overview(manifest: Manifest, plan: RecordedPlan | None, output: Path, plt) -> Path | None:
    overview = manifest.document.get("overview")
    if not overview or plan is None:
        return None
    image = tifffile.imread(manifest.resolve(overview["image"]))
    pixel, x0, y0 = overview["pixel_size_um"], overview["origin_x_um"], overview["origin_y_um"]
    figure, axis = plt.subplots(figsize=(9, 3.6))
    axis.imshow(image, extent=(x0, x0 + image.shape[1] * pixel, y0 + image.shape[0] * pixel, y0))
    from matplotlib.patches import Rectangle
    fields = {}
    for cells, line_width, colour in ((plan.tiles, 0.4, "tab:blue"), (plan.skipped_empty, 0.3, "0.6")):
        for cell in cells:
            x, y, width, height = fields[cell] = plan.grid.field_um(*cell)
            axis.add_patch(Rectangle((x, y), width, height, fill=False, lw=line_width, ec=colour))
    # Zoom to the scanned area (with context around it) rather than the whole slide.
    lefts, tops, widths, heights = (np.array(values) for values in zip(*fields.values()))
    margin = max(1_000.0, 0.3 * max(np.ptp(lefts), np.ptp(tops)))
    axis.set_xlim(lefts.min() - margin, (lefts + widths).max() + margin)
    axis.set_ylim((tops + heights).max() + margin, tops.min() - margin)
    axis.set(xlabel="stage x (µm)", ylabel="stage y (µm)",
             title=f"Overview: {len(plan.tiles)} tiles (blue), {len(plan.skipped_empty)} empty positions skipped "
                   "(grey)")
    return _save(figure, output / "overview_grid.png", plt)


def _plot_focus(manifest: Manifest, plan: RecordedPlan | None, output: Path, plt) -> tuple[Path | None, dict]:
    final = manifest.final_captures()
    truth = {cell: t["ground_truth"]["defocus_um"] for cell, t in final.items() if t.get("ground_truth")}
    errors = {cell: t["predicted_defocus_um"] - t["ground_truth"]["defocus_um"]
              for cell, t in _first_captures(manifest.document["tiles"]).items()
              if t.get("ground_truth") and t.get("predicted_defocus_um") is not None}
    stats = {}
    if truth:
        values = np.abs(list(truth.values()))
        stats["final_abs_defocus_um_median"] = float(np.median(values))
        stats["final_abs_defocus_um_max"] = float(values.max())
    if errors:
        values = np.abs(list(errors.values()))
        stats["autofocus_mae_um"] = float(values.mean())
        stats["autofocus_p95_um"] = float(np.percentile(values, 95))
    if plan is None or not truth:
        return None, stats
    panels = [("true defocus of the kept image (µm)", truth)] + ([("autofocus error, first capture (µm)", errors)]
                                                                  if errors else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (title, values) in zip(axes[0], panels):
        limit = max(1.0, float(np.nanmax(np.abs(list(values.values())))))
        shown = axis.imshow(_grid(plan, values), cmap="coolwarm", vmin=-limit, vmax=limit)
        axis.set(title=title, xlabel="column", ylabel="row")
        figure.colorbar(shown, ax=axis, shrink=0.8)
    return _save(figure, output / "focus_heatmap.png", plt), stats


def _first_captures(tiles: list[dict]) -> dict[tuple[int, int], dict]:
    first = {}
    for tile in tiles:
        first.setdefault((tile["row"], tile["col"]), tile)
    return first


def _plot_registration(report: dict | None, output: Path, plt) -> Path | None:
    if not report or not report.get("edges"):
        return None
    edges = report["edges"]
    kept = [e["residual_px"] for e in edges if e.get("status") == "kept" and e.get("residual_px") is not None]
    tiles = report.get("tiles", [])
    figure, axes = plt.subplots(1, 2 if tiles else 1, figsize=(11 if tiles else 5, 3.6), squeeze=False)
    axis = axes[0][0]
    axis.hist(kept, bins=30, color="tab:green")
    dropped = sum(1 for e in edges if e.get("status") == "dropped")
    axis.set(xlabel="residual at the final tile positions (px)", ylabel="tile pairs",
             title=f"Registration: {len(kept)} pairs kept, {dropped} dropped")
    if tiles:
        # How far each tile was placed from its stage pose, on the scale of the placement limit, so a
        # stage that drifts toward its limit shows before tiles are rejected.
        axis = axes[0][1]
        offsets = {(t["row"], t["col"]): float(np.abs(np.subtract(t["position_px"], t["stage_px"])).max())
                   for t in tiles}  # per axis, like the limit
        grid = np.full((max(r for r, _ in offsets) + 1, max(c for _, c in offsets) + 1), np.nan)
        for (row, col), offset in offsets.items():
            grid[row, col] = offset
        limit = (report.get("summary", {}).get("stage_error_limit") or {}).get("placement_limit_px")
        shown = axis.imshow(grid, cmap="viridis", vmin=0, vmax=limit or np.nanmax(grid))
        for tile in tiles:
            if tile.get("flags") or tile.get("placement") == "stage_position":
                axis.plot(tile["col"], tile["row"], "x", color="tab:red", ms=8)
        axis.set(title="offset from stage pose (px, up to the limit)", ylabel="row",
                 xlabel="column (x: flagged or on its stage pose)")
        figure.colorbar(shown, ax=axis, shrink=0.8)
    return _save(figure, output / "registration_residuals.png", plt)


def _registration_tiles(report: dict | None) -> str:
    """HTML table of the tiles the stitcher did not place by registration alone: flagged (placement
    rejected beyond the stage limit, a link at the search limit) or left on the stage pose."""
    tiles = [t for t in (report or {}).get("tiles", []) if t.get("flags") or t.get("placement") == "stage_position"]
    if not tiles:
        return ""
    rows = []
    for tile in tiles:
        offset = np.subtract(tile["position_px"], tile["stage_px"])
        cells = [str(tile["row"]), str(tile["col"]), tile["placement"], ", ".join(tile.get("flags", [])),
                 f"{offset[0]:+.1f}, {offset[1]:+.1f}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("row", "col", "placement", "flags", "offset from stage (y, x px)"))
    return (f"<h2>Tiles flagged or on their stage pose</h2><table class='tiles'><tr>{header}</tr>"
            f"{''.join(rows)}</table>")


def _focus_sources(manifest: Manifest) -> tuple[dict, str]:
    """Per tile: where its z came from and the sharpness its correction gained (a kept one) or would have
    lost (one refused because it was not sharper); summary counts and an HTML table."""
    final = manifest.final_captures()
    refused = {}
    probes = bracketed = other_way = 0
    for check in manifest.document.get("focus_checks") or []:
        cell = (check["row"], check["col"])
        if check["kind"] == "correction" and final[cell].get("focus_source", FOCUS_MAP) == FOCUS_MAP:
            refused.setdefault(cell, check)
        probes += check["kind"] == "side-probe"
        bracketed += check.get("bracketed_from_offset_um") is not None
        other_way += check.get("other_way_from_offset_um") is not None
    counts = dict.fromkeys(FOCUS_SOURCES, 0)
    rows = []
    for cell in sorted(final):
        tile = final[cell]
        source = tile.get("focus_source", FOCUS_MAP)
        counts[source] = counts.get(source, 0) + 1
        gain = tile.get("sharpness_gain")
        note = ""
        if tile.get("bracketed_from_offset_um") is not None:
            bracketed += 1
            note = f"between the focus map's z and a correction by {tile['bracketed_from_offset_um']:+.2f} µm"
        if tile.get("other_way_from_offset_um") is not None:
            other_way += 1
            note = f"the other way after a correction by {tile['other_way_from_offset_um']:+.2f} µm lost sharpness"
        if cell in refused:
            gain, note = refused[cell]["sharpness_gain"], f"correction by {refused[cell]['offset_um']:+.2f} µm refused: not sharper"
        truth = (tile.get("ground_truth") or {}).get("defocus_um")
        cells = [f"{cell[0]}", f"{cell[1]}", source, f"{tile['commanded_z_um']:.2f}",
                 "" if tile.get("predicted_defocus_um") is None else f"{tile['predicted_defocus_um']:+.2f} ± {tile['predicted_uncertainty_um']:.2f}",
                 "" if gain is None else f"{gain:+.1%}", "" if truth is None else f"{truth:+.2f}", note]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    # Every source, 0 where no tile used it: a robot reading summary.json finds the same keys in every scan.
    summary = {f"tiles focused by {source}": count for source, count in counts.items()}
    summary["corrections refused (not sharper)"] = len(refused)
    summary["side probes"] = probes
    summary["corrections that went on to bracket focus"] = bracketed
    summary["corrections tried the other way (they lost sharpness)"] = other_way
    header = "".join(f"<th>{h}</th>" for h in ("row", "col", "focus source", "z (µm)", "autofocus estimate (µm)",
                                               "sharpness gained", "true defocus (µm)", ""))
    return summary, f"<table class='tiles'><tr>{header}</tr>{''.join(rows)}</table>"


def _plot_timing(document: dict, output: Path, plt) -> Path | None:
    times = [t.get("captured_s", 0.0) for t in document["tiles"]]
    if len(times) < 2:
        return None
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(times, np.arange(1, len(times) + 1), color="tab:purple")
    axis.set(xlabel="seconds since the scan started", ylabel="images captured",
             title=f"Timing: {len(times)} images in {document['duration_s']:.0f} s")
    return _save(figure, output / "timing.png", plt)


def write_qc_report(manifest_path: Path, registration_report: Path | None = None,
                    outputs: dict[str, Path] | None = None) -> Path:
    """Write <scan>/qc/index.html (+ PNGs) and return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = Manifest.read(manifest_path)
    plan = manifest.plan()
    document = manifest.document
    output = manifest.resolve(REPORT_DIR)
    output.mkdir(exist_ok=True)
    report = json.loads(Path(registration_report).read_text()) if registration_report else None
    focus_png, focus_stats = _plot_focus(manifest, plan, output, plt)
    figures = [("Overview and tile grid", _plot_overview(manifest, plan, output, plt)),
               ("Focus", focus_png), ("Registration", _plot_registration(report, output, plt)),
               ("Timing", _plot_timing(document, output, plt))]
    final = manifest.final_captures()
    summary = {"scan": document["scan_id"], "status": document["status"], "tiles kept": len(final),
               "images captured": len(document["tiles"]), "re-captured (refocus)": document["refocus_count"],
               "objective": f"{document['objective_magnification']:g}x / NA {document['numerical_aperture']:.2f}",
               "pixel size (µm)": f"{document['pixel_size_um']:.4f}", "duration (s)": f"{document['duration_s']:.1f}"}
    summary |= {key.replace("_", " "): f"{value:.3f}" for key, value in focus_stats.items()}
    source_summary, source_table = _focus_sources(manifest)
    summary |= source_summary
    if report:
        summary |= {f"registration {k.replace('_', ' ')}": v for k, v in report.get("summary", {}).items()}
    for name, path in (outputs or {}).items():
        size = sum(f.stat().st_size for f in Path(path).rglob("*")) if Path(path).is_dir() else Path(path).stat().st_size
        summary[f"output {name}"] = f"{Path(path).name} ({size / 1e6:.1f} MB)"
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    sections = "\n".join(f"<h2>{html.escape(title)}</h2><img src='{png.name}' alt='{html.escape(title)}'>"
                         for title, png in figures if png is not None)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>QC {html.escape(document['scan_id'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}img{max-width:100%}"
            "table.tiles td{padding:0 .6em}"
            f"</style></head><body><h1>Scan QC: {html.escape(document['scan_id'])}</h1><table>{rows}</table>"
            f"{sections}{_registration_tiles(report)}<h2>Focus source of every tile</h2>{source_table}"
            "</body></html>")
    index = output / "index.html"
    index.write_text(page)
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return index
