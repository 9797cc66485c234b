from rinna_cli.cli import main

main()
