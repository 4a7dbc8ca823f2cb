from setuptools import find_packages, setup

PACKAGE = "wsi"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", ["launch/scan.launch.py"]),
        (f"share/{PACKAGE}/config", ["config/micromanager_scanner.yaml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    entry_points={"console_scripts": ["wsi = wsi.cli:main", "recorder_node = wsi.recorder_node:main",
                                      "lifecycle_manager = wsi.lifecycle_manager:main"]},
)
