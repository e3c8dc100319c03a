from caictl.cli import main

main()
