"""`python -m vlm.constitution`: see vlm/constitution/__init__.py."""

from vlm.constitution import main

main()
