from setuptools import find_packages, setup

setup(
    name="appscale-tq",
    version="0.1.0",
    description="A push task queue for App Engine-style platforms, on Twisted, RabbitMQ and Redis",
    python_requires=">=3.10",
    packages=find_packages(include=["appscale_tq", "appscale_tq.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/appscale_tq_plugin.py"]},
    install_requires=[
        "twisted>=23.10",
        "pika>=1.3,<2",
        "treq>=23.11",
        "txredisapi>=1.4.10",
        "pyyaml>=6",
        "attrs>=23.1",
        "zope.interface>=6",
        "protobuf>=4.21",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6", "coverage>=7", "wheel",
                 "appengine-python-standard>=3.1"],
    },
    entry_points={"console_scripts": ["appscale-tq = appscale_tq.cli:main"]},
)
