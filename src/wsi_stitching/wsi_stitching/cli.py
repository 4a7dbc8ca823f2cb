"""Stitch a scan from its manifest and tile files, or finish or check the mosaic already made of it.

    python -m wsi_stitching.cli out/<scan>/manifest.json [--output out/<scan>/mosaic.zarr] [--redo]
        [--blending feather] [--flat-field estimate] [--stage-repeatability-um 10]

The manifest's scan plan gives the layout exactly as the stitching node had it, so a mosaic the node
started is resumed (interrupted) or confirmed (finished: checked against the manifest, report rewritten,
nothing recomposed), with the parameters it was made with unless an option says otherwise. --redo
removes it and stitches anew. Prints the mosaic size, what was done, and the registration summary.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from wsi_common.scan_files import ManifestError
from wsi_stitching.errors import StitchingError
from wsi_stitching.stitcher import StitchParameters, journaled_parameters, stitch_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_stitching.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--output", type=Path, help="mosaic path (default: mosaic.zarr beside the manifest)")
    parser.add_argument("--redo", action="store_true", help="remove an existing mosaic and stitch anew")
    parser.add_argument("--blending", help="feather, none or sharpness (default: as the mosaic was made, else feather)")
    parser.add_argument("--flat-field", help="estimate or none (default: as the mosaic was made, else estimate)")
    parser.add_argument("--stage-repeatability-um", type=float,
                        help="largest error of a reported stage pose, µm (default: as the mosaic was made, else "
                             f"{StitchParameters.stage_repeatability_um})")
    args = parser.parse_args(argv)
    output = args.output or args.manifest.parent / "mosaic.zarr"
    options = {"blending": args.blending, "flat_field": args.flat_field,
               "stage_repeatability_um": args.stage_repeatability_um}
    try:
        parameters = replace(journaled_parameters(output) or StitchParameters(),
                             **{key: value for key, value in options.items() if value is not None})
        result = stitch_manifest(args.manifest, output, parameters, redo=args.redo)
    except (StitchingError, ManifestError) as error:
        print(f"wsi_stitching: {error}", file=sys.stderr)
        return 1
    done = {"new": "stitched", "resumed": "resumed and finished", "confirmed": "confirmed complete"}[result.run]
    print(f"mosaic {result.mosaic_path} {done}: {result.width_px} x {result.height_px} px at "
          f"{result.pixel_size_um:.4f} µm/px")
    print(json.dumps(json.loads(result.report_path.read_text())["summary"] | {"report": str(result.report_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
