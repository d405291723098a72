from ckpt.store.cli import main

main()
