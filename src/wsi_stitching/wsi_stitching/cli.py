"""Stitch a finished scan from its manifest and tile files.

    python -m wsi_stitching.cli out/<scan>/manifest.json [--output out/<scan>/mosaic.zarr] [--blending feather]

Resumes an interrupted run of the same scan; prints the mosaic size and the registration summary.
"""
import argparse
import json
import sys
from pathlib import Path

from wsi_stitching.errors import StitchingError
from wsi_stitching.stitcher import StitchParameters, stitch_manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_stitching.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--output", type=Path, help="mosaic path (default: mosaic.zarr beside the manifest)")
    parser.add_argument("--blending", default="feather", help="feather, none or sharpness")
    parser.add_argument("--flat-field", default="estimate", help="estimate or none")
    args = parser.parse_args(argv)
    output = args.output or args.manifest.parent / "mosaic.zarr"
    try:
        result = stitch_manifest(args.manifest, output, StitchParameters(blending=args.blending,
                                                                         flat_field=args.flat_field))
    except StitchingError as error:
        print(f"wsi_stitching: {error}", file=sys.stderr)
        return 1
    print(f"mosaic {result.mosaic_path}: {result.width_px} x {result.height_px} px at {result.pixel_size_um:.4f} µm/px")
    print(json.dumps(json.loads(result.report_path.read_text())["summary"] | {"report": str(result.report_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
