"""``indexing.machine``: the machine block every ``fusionrank bench ...`` JSON carries."""

from __future__ import annotations

import os

from indexing.machine import KERNEL_ISA, machine_info, parse_cpuinfo

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_int8 amx_tile
bogomips\t: 5199.99

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu sse2
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_the_first_processor_and_keeps_only_kernel_flags_in_a_fixed_order():
    model, isa = parse_cpuinfo(X86)
    assert model == "Intel(R) Xeon(R) Processor"  # the first processor's, not the second's
    assert isa == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"]  # KERNEL_ISA's order, no sse2/fpu
    assert all(f in KERNEL_ISA for f in isa)


def test_parse_cpuinfo_on_arm_and_on_nothing():
    assert parse_cpuinfo(ARM) == (None, [])  # no model name line, none of the x86 flags
    assert parse_cpuinfo("") == (None, [])


def test_machine_info_from_a_file_and_without_one(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(X86)
    m = machine_info(f)
    assert m["cpu_model"] == "Intel(R) Xeon(R) Processor" and "amx_int8" in m["cpu_isa"]
    assert m["cpu_count"] == os.cpu_count() and 1 <= m["cpus_usable"] <= m["cpu_count"]
    assert isinstance(m["arch"], str) and m["arch"]
    missing = machine_info(tmp_path / "absent")
    assert missing["cpu_isa"] is None  # unknown, not "none present"
    assert missing["cpu_count"] == os.cpu_count()
