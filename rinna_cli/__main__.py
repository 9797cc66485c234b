from rinna_cli.entry import main

main()
