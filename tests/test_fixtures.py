"""The shared fixtures of tests/conftest.py, run in a pytest of their own."""

from pathlib import Path

pytest_plugins = ["pytester"]


def test_large_tmp_path_is_removed_after_a_passing_or_failing_test(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_inner='''
        def write(large_tmp_path, tmp_path):
            assert large_tmp_path.is_dir() and large_tmp_path.parent == tmp_path
            (large_tmp_path / "weights.bin").write_bytes(bytes(1 << 16))
            (tmp_path / "kept.txt").write_text("kept")

        def test_passes(large_tmp_path, tmp_path):
            write(large_tmp_path, tmp_path)

        def test_fails(large_tmp_path, tmp_path):
            write(large_tmp_path, tmp_path)
            assert False, "fails on purpose"
    ''')
    basetemp = pytester.path / "basetemp"
    result = pytester.runpytest_inprocess(f"--basetemp={basetemp}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*fails on purpose*"])
    for name in ("test_passes0", "test_fails0"):
        assert (basetemp / name / "kept.txt").read_text() == "kept"
        assert not (basetemp / name / "large").exists()
