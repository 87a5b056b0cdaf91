-- benches/customers.sql — the `customers` table of the benchmarks: ROWS rows (psql
-- variable `rows`) of fake Chinese-style data from generate_series: names like 张三丰,
-- 11-digit mobiles (13x/15x/18x…), 18-character resident ID numbers with a real region
-- code, birth date and GB 11643 check digit. Used by protected_read.sh and encryption.sh.
--
-- Usage: psql -v rows=100000 -v ON_ERROR_STOP=1 -f benches/customers.sql

CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, phone text NOT NULL, id_card text NOT NULL);

-- Deterministic fake data: every field picks from its list with an independent hash of id.
INSERT INTO customers (id, name, phone, id_card)
WITH lists AS (
    SELECT
        string_to_array('王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤', NULL) AS surnames,
        string_to_array('伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超兰霞平刚华玉萍红玲芬燕春菊凤洁梅琳云莲雪荣爱香月媛瑞凡佳嘉琼珍莉晶妍秋珊锦青倩婷颖露瑶怡丹蓉君琴薇梦岚馨悦冰宁欣柔晓欢枫芸菲建国志文海波宇浩然子轩博涵俊鹏飞鑫斌三丰', NULL) AS given,
        ARRAY['130','131','132','133','135','136','137','138','139','150','151','152','155','156',
              '157','158','159','176','177','180','181','182','185','186','187','188','189','199'] AS prefixes,
        ARRAY['110101','110105','110108','310101','310104','310115','440103','440106','440305',
              '320102','320106','330106','330110','510104','510107','420102','420106','610113',
              '370102','500103','120101','210102','230102','350203','430102'] AS regions,
        ARRAY[7,9,10,5,8,4,2,1,6,3,7,9,10,5,8,4,2] AS weights
), draws AS (
    SELECT i, l.*, ARRAY(SELECT abs(hashint4extended(i, k) % 1000000007)::int FROM generate_series(1, 9) k) AS h
    FROM generate_series(1, :rows) i, lists l
), fields AS (
    SELECT i, weights,
        surnames[1 + h[1] % cardinality(surnames)]
            || given[1 + h[2] % cardinality(given)]
            || CASE WHEN h[3] % 4 = 0 THEN '' ELSE given[1 + h[4] % cardinality(given)] END AS name,
        prefixes[1 + h[5] % cardinality(prefixes)] || lpad((h[6] % 100000000)::text, 8, '0') AS phone,
        regions[1 + h[7] % cardinality(regions)]
            || to_char(date '1950-01-01' + h[8] % 20000, 'YYYYMMDD')
            || lpad((h[9] % 1000)::text, 3, '0') AS id17
    FROM draws
)
SELECT i, name, phone,
    id17 || substr('10X98765432',
        1 + (SELECT sum(substr(id17, k, 1)::int * weights[k]) FROM generate_series(1, 17) k)::int % 11, 1)
FROM fields;

-- The SPEC's example customer as id 1, so the check shows familiar values.
UPDATE customers SET name = '张三丰', phone = '13812345678', id_card = '110105199001011234' WHERE id = 1;
VACUUM ANALYZE customers;
