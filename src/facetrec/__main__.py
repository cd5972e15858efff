from facetrec.cli import main

main()
