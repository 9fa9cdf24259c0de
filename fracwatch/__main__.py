from fracwatch.cli import main

main()
