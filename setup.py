from setuptools import find_packages, setup

setup(
    name="deals_pipeline",
    version="0.1.0",
    description="Keepa deals collector as a Dagster project: exactly-once chunked backfill, "
    "refill-sized upserts, one shared token budget, embedded Keepa simulator.",
    packages=find_packages(exclude=["deals_pipeline_tests", "benchmarks"]),
    python_requires=">=3.10",
    install_requires=[
        "dagster>=1.13,<1.14",
        "dagster-webserver>=1.13,<1.14",
        "pandas>=2.2,<4",
        "pyarrow>=15,<30",
        "requests>=2.31,<3",
        "duckdb>=1.1,<3",
        "tenacity>=8.2,<10",
        "rich>=13,<16",
    ],
    extras_require={
        "dev": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "psutil>=5.9,<8",
            "pytest-timeout>=2.3,<3",
            "pytest-xdist>=3.6,<4",
            "keepa>=1.6,<2",  # the public Keepa client, a second client of the simulator in tests
            "dagster-dg-cli>=1.13,<1.14",  # `dg check defs`
            "dagster-postgres>=0.29,<0.30",  # the soak runs the production instance
        ],
        # What a long-running deployment adds: instance storage on PostgreSQL (docs/DEPLOYMENT.md).
        "production": [
            "dagster-postgres>=0.29,<0.30",
        ],
    },
    entry_points={"console_scripts": ["deals-pipeline=deals_pipeline.cli:main"]},
)
