from setuptools import find_packages, setup

setup(
    name="mindone-lumina",
    version="0.1.0",
    description="Lumina-Next (Next-DiT, Gemma-2B, SDXL-VAE, flow matching) in MindSpore for Ascend and CPU",
    packages=find_packages(include=["mindone_lumina", "mindone_lumina.*"]),
    package_data={"mindone_lumina": ["assets/**/*", "csrc/*"]},  # csrc: compiled at first use (cpu_kernels.py)
    python_requires=">=3.10",
    install_requires=[
        "mindspore==2.10.0",
        "mindone==0.5.0",
        "ml_dtypes==0.5.1",  # imported by mindone.trainers (ZeRO), not declared by mindone 0.5.0
        "transformers==4.57.1",
        "numpy<2",
        # mindone needs opencv-python (any version); every release after 4.11 needs numpy>=2, so an unpinned resolve
        # downloads and discards several 60-70 MB wheels before it settles on 4.11: name the one that fits numpy<2
        "opencv-python<4.12",
        "pillow",
        "safetensors",
        "huggingface-hub",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # tools/web_demo.py. Gradio 6.17.3 is the newest that installs beside transformers 4.57.1: from 6.18.0 on it
        # needs huggingface-hub>=1.2, and transformers 4.57.1 needs huggingface-hub<1.0 (it resolves to 0.36.2).
        # gradio_client 2.5.0 is the one gradio 6.17.3 pins; gradio also holds pillow below 13.
        "demo": ["gradio==6.17.3", "gradio_client==2.5.0"],
        # The PyTorch reference. Install torch==2.13.0 (CPU build) *before* this extra: pip must not pick a CUDA build.
        # torchdiffeq: the solvers' reference; fairscale: runs the original Lumina-T2I code in
        # tests/fixtures/make_fixtures.py.
        "test": [
            "torch==2.13.0",
            "diffusers==0.35.2",
            "torchdiffeq==0.2.5",
            "fairscale==0.4.13",
            "pytest",
            "ruff==0.17.6",
            "tokenizers",
            "matplotlib",
            # tests/test_web_demo.py: the demo's server and API client, and a real browser (Debian's chromium through
            # its chromium-driver, which .ci/run installs with apt). selenium 4.53 needs a certifi newer than the
            # package index here has; 4.51.0 is the newest that installs.
            "gradio==6.17.3",
            "gradio_client==2.5.0",
            "selenium==4.51.0",
            # tests/test_lora.py: adapters exchanged with peft on diffusers' LuminaNextDiT2DModel (peft 0.21.2 and its
            # accelerate install beside the pins above without changing them)
            "peft==0.21.2",
            "accelerate==1.16.0",
        ],
    },
)
