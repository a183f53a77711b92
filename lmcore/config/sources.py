"""The catalogue of pinned public data: fine-tuning, benchmark and generative benchmark files by URL and sha256
(found in LMCORE_MIRROR by checksum before any download). The params sections default to these."""

from __future__ import annotations

from lmcore.config.data import Source


# Fine-tuning data: public files pinned by sha256 (found in LMCORE_MIRROR by checksum before any download).
_RAW = "https://raw.githubusercontent.com"
SMS_SPAM = Source(
    name="sms-spam",
    url=f"{_RAW}/PARKER-X/SpamClassifier/5fa41eaf3ec0d21d3ffced673800d25b6b8ffc20/smsspamcollection/SMSSpamCollection",
    sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
    license="UCI SMS Spam Collection v.1 (Almeida & Gomez Hidalgo 2011), CC BY 4.0",
)
_CH07 = f"{_RAW}/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07"
INSTRUCTION_DATA = Source(
    name="instruction-data",
    url=f"{_CH07}/01_main-chapter-code/instruction-data.json",
    sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    license="Apache-2.0 (rasbt/LLMs-from-scratch)",
)
PREFERENCE_DATA = Source(
    name="instruction-data-with-preference",
    url=f"{_CH07}/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
    sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    license="Apache-2.0 (rasbt/LLMs-from-scratch)",
)


# Benchmark data (MANIFEST of ../shared/data gives each file's provenance). Found in LMCORE_MIRROR by checksum first.
BENCHMARK_SOURCES = [
    Source(
        name="hellaswag",
        url=f"{_RAW}/klosax/hellaswag_text_data/1105d370f8340eac3c63a91fd1fa58e8999f9505/hellaswag_val_full.txt.bz2",
        sha256="50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
        license="MIT (HellaSwag, Zellers et al. 2019); validation split, six-line text form",
    ),
    Source(
        name="arc-easy",
        url=f"{_RAW}/RazvanDu/TemporalRNNs/93811e3f9f8c5c1f63650153541cd6c626dafcc0/ARC-Easy/ARC-Easy-Test.jsonl",
        sha256="ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
        license="CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    ),
    Source(
        name="arc-challenge",
        url=f"{_RAW}/RazvanDu/TemporalRNNs/93811e3f9f8c5c1f63650153541cd6c626dafcc0/ARC-Challenge/ARC-Challenge-Test.jsonl",
        sha256="9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
        license="CC BY-SA 4.0 (AI2 Reasoning Challenge)",
    ),
    Source(
        name="truthfulqa-mc",
        url=f"{_RAW}/newBlanco/Modified_truthX/39e91d49c5b26bdef976da70be6c12829739e83e/TruthfulQA/data/mc_task.json",
        sha256="b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a",
        license="Apache-2.0 (TruthfulQA, Lin et al. 2021)",
    ),
    # The 57-subject CSVs of the MMLU release, repacked as a tarball for the mirror: it has no public URL.
    # Online, use url: https://people.eecs.berkeley.edu/~hendrycks/data.tar with that file's sha256 instead
    # (the reader takes either archive: both hold data/{dev,test}/<subject>_{dev,test}.csv).
    Source(
        name="mmlu",
        sha256="1367baf725bff533e504686a5d59611eae5db7aaa2fc04e106614dbf739a3c19",
        license="MIT (MMLU, Hendrycks et al. 2021)",
    ),
]


# Generative benchmark data (MANIFEST of ../shared/data), found in LMCORE_MIRROR by checksum first.
GENERATIVE_SOURCES = [
    Source(
        name="ifeval",
        url=f"{_RAW}/google-research/google-research/19638399cc9e03623c5b9087a1d6fa8813974ce9/instruction_following_eval/data/input_data.jsonl",
        sha256="67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
        license="CC BY 4.0 (IFEval, Zhou et al. 2023)",
    ),
    Source(
        name="gsm8k-test",
        url=f"{_RAW}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl",
        sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        license="MIT (GSM8K, Cobbe et al. 2021)",
    ),
    Source(
        name="gsm8k-train",
        url=f"{_RAW}/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl",
        sha256="17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
        license="MIT (GSM8K, Cobbe et al. 2021); its few-shot examples",
    ),
]
