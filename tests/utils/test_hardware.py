"""The CPU's flags and model read from /proc/cpuinfo text, and which devices have native bf16."""

from retina_scale.utils.hardware import bf16_capable, cpu_flags, cpu_model

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: another
flags\t\t: fpu
"""

ARM = """processor\t: 0
Features\t: fp asimd bf16 sve
CPU implementer\t: 0x41
"""


def test_flags_and_model_come_from_the_first_processor():
    assert cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
    assert cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_flags(ARM) == {"fp", "asimd", "bf16", "sve"} and cpu_model(ARM) == "unknown"
    assert cpu_flags("") == set() and cpu_model("") == "unknown"


def test_bf16_is_native_with_amx_or_avx512_bf16_or_on_ampere_and_later_gpus():
    assert bf16_capable(cpu_flags(CPUINFO))
    assert bf16_capable({"avx512_bf16"}) and bf16_capable({"amx_bf16"})
    assert not bf16_capable({"avx512f", "avx512_vnni", "avx2"})
    assert bf16_capable(set(), gpus=[(8, 6), (9, 0)]) and not bf16_capable({"amx_bf16"}, gpus=[(8, 0), (7, 0)])
