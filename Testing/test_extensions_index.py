"""Ready for the Slicer Extensions Index: the checks of its scripts/check_description_files.py
(Slicer/ExtensionsIndex, fetched 2026-08-07) that can run offline, replicated on this repository —
JSON format (LF, parses), the catalog-entry schema v1.0.2's required keys and types, the category,
the extension name (= CMake project, not starting with "Slicer"), the repository name (starting with
"Slicer"), the scm_url scheme, EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS set (pointing at files of
this repository), a LICENSE at the root, the repository size (< 100 MB). Not replicated: the clone,
the URL downloads and the GitHub topics (they need the network), the dependency check (PyTorch is
an extension of the Index)."""

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "Resources" / "ExtensionsIndex" / "MedVLSMSlicer.json"
SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
                "tier": int}


def cmake_set(cmake: str, name: str) -> str:
    match = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE)
    assert match, f"{name} is not set in CMakeLists.txt"
    return match.group(1)


def test_the_description_file_passes_the_index_checks():
    raw = DESCRIPTION.read_bytes()
    assert b"\r" not in raw  # check_json_file_format: LF only
    metadata = json.loads(raw)
    extension = DESCRIPTION.stem
    assert {"$schema", "category", "scm_url"} <= set(metadata)  # the schema's required keys
    assert set(metadata) <= set(SCHEMA_TYPES) and all(isinstance(v, SCHEMA_TYPES[k]) for k, v in metadata.items())
    assert metadata["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                          "slicer-extension-catalog-entry-schema-v1.0.")
    assert 1 <= metadata["tier"] <= 5 and metadata["category"] == "Segmentation"  # an accepted category
    assert not extension.lower().startswith("slicer")  # check_extension_name
    url = urlsplit(metadata["scm_url"])
    assert url.scheme in ("git", "https")  # check_scm_url_syntax
    assert Path(url.path).stem.startswith("Slicer")  # check_git_repository_name
    assert metadata["build_dependencies"] == ["PyTorch"]


def test_cmakelists_matches_the_description_and_points_at_files_that_exist():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    metadata = json.loads(DESCRIPTION.read_text(encoding="utf-8"))
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", cmake)[0] == DESCRIPTION.stem  # check_cmakelists_content
    repository = urlsplit(metadata["scm_url"]).path.strip("/")
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_set(cmake, name).split():
            prefix = f"https://raw.githubusercontent.com/{repository}/{metadata['scm_revision']}/"
            assert url.startswith(prefix) and (ROOT / url[len(prefix):]).is_file(), url
    assert cmake_set(cmake, "EXTENSION_HOMEPAGE") == metadata["scm_url"]
    assert cmake_set(cmake, "EXTENSION_DEPENDS") == " ".join(metadata["build_dependencies"])
    assert cmake_set(cmake, "EXTENSION_CATEGORY") == metadata["category"]


def test_license_at_the_root_and_the_repository_is_small():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")  # check_license_file
    assert "Apache License" in license_text and "Version 2.0" in license_text
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    size = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert size < 100 * 2**20, f"{size / 2**20:.0f} MB"  # check_repository_size
