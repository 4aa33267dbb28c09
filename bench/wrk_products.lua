-- wrk script: GET /products/<random id>.json, ids 1..5000 (the Flask example's catalogue)
math.randomseed(os.time())

request = function()
  return wrk.format("GET", "/products/" .. math.random(1, 5000) .. ".json")
end
