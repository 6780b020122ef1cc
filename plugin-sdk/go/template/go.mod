module example.com/{{name}}

go 1.26

require watchgate.dev/sdk v0.0.0

replace watchgate.dev/sdk => {{sdk}}/go
